"""Robustness fuzzing of the wire decoder (netpass.wire).

The property: whatever bytes a peer sends, ``receive_data`` / ``next_event`` return events or
raise RemoteProtocolError (never another exception), and never hold more than
``Limits.max_buffer_bytes``.

Inputs are valid sessions, recorded by letting two deterministic :class:`Responder` policies
talk to each other, then mutated (bit flips, header-aware length and type corruption, splices,
truncation, floods, protocol 1.1 messages dropped in, valid or not) and fed to a fresh
receiver in random chunks. The receiver runs the same policy as when the session was
recorded, so an unmutated input replays exactly and must be accepted whole: that guards
against a fuzzer that only ever exercises the error paths.

``run_fuzz(cases)`` is a seeded, dependency-free mutator for the benchmark.
``python -m netpass.fuzz_wire --atheris [libFuzzer flags]`` runs the same target under
atheris (coverage-guided) when it is installed.
"""

from __future__ import annotations

import hashlib
import importlib
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Final, TypedDict
from uuid import UUID

from netpass.wire import (
    HEADER_SIZE,
    MAGIC,
    NEED_DATA,
    PAUSED,
    SUPPORTED_FEATURES,
    Abort,
    Ack,
    Bye,
    CaptureOn,
    Connection,
    Counts,
    End,
    Error,
    Event,
    Feature,
    FrameRecord,
    Frames,
    GiveBack,
    Hello,
    Hold,
    Limits,
    Message,
    MsgType,
    NicFilter,
    NicFilterFlag,
    NicSpec,
    NicSummary,
    Peer,
    Ping,
    Pong,
    Prepare,
    Prepared,
    RemoteProtocolError,
    Role,
    State,
    UsedIdx,
    UsedPhase,
    VmStarted,
    encode_message,
)

# "plain" negotiates no feature; in "v1_0" the leader speaks version 1.0 (no SWITCHOVER).
SCENARIOS: Final = ("complete", "two_migrations", "abort", "refuse", "give_back", "plain", "v1_0")
_MIDS: Final = (
    UUID("6e657470-6173-4d00-8000-000000000001"),
    UUID("6e657470-6173-4d00-8000-000000000002"),
)
_MAC0: Final = bytes.fromhex("525400123456")
_MAC1: Final = bytes.fromhex("525400654321")
_MCAST: Final = (bytes.fromhex("01005e000001"), bytes.fromhex("333300000001"), b"\xff" * 6)
TIGHT_LIMITS: Final = Limits(
    max_message_bytes=32 * 1024,
    max_frames_per_batch=16,
    max_frame_bytes=2048,
    max_vnet_hdr_bytes=32,
    max_buffer_bytes=64 * 1024,
)


def _frame(nic: int, n: int, vnet: bool) -> FrameRecord:
    # A small Ethernet frame (local experimental EtherType 0x88b5) that names its position.
    dst = _MAC0 if nic == 0 else _MAC1
    eth = dst + bytes.fromhex("5254000000ff") + b"\x88\xb5" + f"nic{nic} frame{n}".encode()
    return FrameRecord(bytes(12) + eth, 12) if vnet else FrameRecord(eth)


class Responder:
    """A deterministic peer policy: what a netpass process sends back for each event.

    Two responders of paired roles and the same scenario run a whole session: HELLO,
    PREPARE, CAPTURE_ON, FRAMES, VM_STARTED, END (or ABORT / GIVE_BACK), COUNTS, PING/PONG
    and BYE; on the control channel also NIC_FILTER, PEER, USED_IDX and HOLD when
    SWITCHOVER is negotiated (in "give_back" the orchestrator reports RESUMED and aborts, as
    after a failed migration). Every send is guarded by ``can_send``, so a confused (fuzzed)
    session never makes the policy itself break the protocol.
    """

    def __init__(self, conn: Connection, scenario: str = "complete") -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}")
        self.conn = conn
        self.scenario = scenario
        self.events: list[Event] = []
        self._out: list[bytes] = []
        self._migrations = 2 if scenario == "two_migrations" else 1
        self._started = 0
        self._frames_seen: set[UUID] = set()  # migrations whose first FRAMES arrived

    def start(self) -> list[bytes]:
        conn = self.conn
        hello = conn.make_hello(
            f"{conn.our_role.name.lower()}-host",
            Feature.NONE if self.scenario == "plain" else SUPPORTED_FEATURES,
        )
        if self.scenario == "v1_0" and conn.our_role.leads:
            hello = replace(hello, version=(1, 0), features=Feature.VNET_HDR | Feature.COUNTS)
        self._send(hello)
        return self._flush()

    def feed(self, data: bytes) -> list[bytes]:
        """Give the connection ``data``; return what the policy sends in response."""
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            assert isinstance(event, Event)
            self.events.append(event)
            self._react(event)
        return self._flush()

    def _flush(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def _send(self, msg: Message) -> None:
        if self.conn.can_send(msg):
            self._out.append(self.conn.send(msg))

    def _features(self) -> Feature:
        return self.conn.negotiated_features or Feature.NONE

    def _react(self, ev: Event) -> None:
        conn, role = self.conn, self.conn.our_role
        mid = conn.migration_id
        match ev:
            case Hello():
                if role.leads:
                    self._send(Ping(1_000_000))
                    self._prepare()
            case Ping():
                self._send(Pong(ev.t1_ns, ev.t1_ns + 5_000, ev.t1_ns + 7_000))
            case Prepare():
                if self.scenario == "refuse":
                    self._send(Abort(ev.migration_id, "tap not found"))
                else:
                    self._send(Prepared(ev.migration_id))
            case Prepared():
                if self.scenario == "abort":
                    self._send(Abort(ev.migration_id, "migration cancelled"))
                else:
                    self._send(CaptureOn(ev.migration_id))
            case CaptureOn():
                self._send(Ack(ev.migration_id, MsgType.CAPTURE_ON))
                # A control-channel agent reports and ends by itself; with HOLD_ACK (1.2) only
                # once it has answered the orchestrator's HOLD.
                if role is Role.AGENT and Feature.HOLD_ACK not in self._features():
                    self._agent_end(ev.migration_id)
            case Hold():
                if role is Role.AGENT and Feature.HOLD_ACK in self._features():
                    self._send(Ack(ev.migration_id, MsgType.HOLD))
                    self._agent_end(ev.migration_id)
            case Ack(acked=MsgType.CAPTURE_ON):
                if role is Role.SOURCE_AGENT:
                    self._frames(0, 0, 3)
                    self._frames(1, 0, 2)
                    self._counts(ev.migration_id)
                elif role is Role.ORCHESTRATOR and self._switchover(ev.migration_id):
                    self._send(VmStarted(ev.migration_id, 1_700_000_000_000_000_001))
            case Frames():
                if mid is not None and mid not in self._frames_seen:
                    self._frames_seen.add(mid)
                    if self.scenario == "give_back":
                        self._send(GiveBack(mid, "destination VM failed to start"))
                    else:
                        self._send(VmStarted(mid, 1_700_000_000_000_000_002))
            case VmStarted():
                if role is Role.SOURCE_AGENT and mid is not None:
                    self._frames(0, conn.next_frame_index(0), 1)
                    self._send(End(mid, conn.frame_summaries()))
            case End():
                self._send(Ack(ev.migration_id, MsgType.END))
                if role is Role.DEST_AGENT:
                    self._counts(ev.migration_id)
            case Abort() | GiveBack():
                self._send(Ack(ev.migration_id, ev.TYPE))
            case Bye():
                self._send(Bye())
        if role.leads:
            self._maybe_next()

    def _prepare(self) -> None:
        if self._started >= self._migrations:
            return
        nics = (NicSpec(0, "tap0", _MAC0, 1), NicSpec(1, "tap1", _MAC1, 4))
        mid = _MIDS[self._started]
        msg = Prepare(mid, "vm-fuzz", nics)
        if self.conn.can_send(msg):
            self._started += 1
            self._out.append(self.conn.send(msg))
            if self._orchestrating():
                # The source host's half: the guest's receive filters and the destination agent.
                self._send(NicFilter(mid, 0, NicFilterFlag(0), _MCAST[:2], ()))
                self._send(NicFilter(mid, 1, NicFilterFlag.ALL_MULTICAST, _MCAST, (_MAC0,)))
                self._send(Peer(mid, "dest-host", 7440, "dest-agent"))

    def _orchestrating(self) -> bool:
        return self.conn.our_role is Role.ORCHESTRATOR and Feature.SWITCHOVER in self._features()

    def _switchover(self, mid: UUID) -> bool:
        """The orchestrator relays what QMP said; False if the migration failed (give_back)."""
        if not self._orchestrating():
            return True
        self._send(UsedIdx(mid, UsedPhase.BASELINE, ((0, 100), (1, 65530))))
        self._send(UsedIdx(mid, UsedPhase.OBSERVE, ((0, 140), (1, 2))))
        if self.scenario == "give_back":
            self._send(UsedIdx(mid, UsedPhase.RESUMED, ()))
            self._send(Abort(mid, "migration failed; the source VM runs again"))
            return False
        self._send(UsedIdx(mid, UsedPhase.OBSERVE, ((1, 9),)))
        self._send(UsedIdx(mid, UsedPhase.STOPPED, ()))
        self._send(Hold(mid))
        self._send(UsedIdx(mid, UsedPhase.FINAL, ((1, 12), (0, 150))))
        return True

    def _maybe_next(self) -> None:
        # Once the migration is closed on our side, start the next one or say goodbye.
        conn = self.conn
        if conn.migration_id is None or conn.our_state is not State.IDLE:
            return
        if self._started < self._migrations:
            self._prepare()
        else:
            self._send(Bye())

    def _frames(self, nic: int, first: int, n: int) -> None:
        vnet = Feature.VNET_HDR in self._features() and nic == 1
        if self.conn.migration_id is None or self.conn.next_frame_index(nic) != first:
            return
        for msg in self.conn.batch_frames(nic, [_frame(nic, first + i, vnet) for i in range(n)]):
            self._send(msg)

    def _agent_end(self, mid: UUID) -> None:
        self._send(VmStarted(mid, 1_700_000_000_000_000_000))
        self._counts(mid)
        digest = hashlib.sha256(b"agent").digest()
        nics = (NicSummary(0, 3, digest), NicSummary(1, 0, hashlib.sha256().digest()))
        self._send(End(mid, nics))

    def _counts(self, mid: UUID) -> None:
        if Feature.COUNTS in self._features():
            self._send(Counts(mid, (("captured", 4), ("injected", 4), ("dropped", 0))))


def run_session(role: Role, scenario: str = "complete") -> tuple[bytes, bytes]:
    """Let ``role`` and its peer run ``scenario``; return the bytes each of them sent."""
    a = Responder(Connection(role), scenario)
    b = Responder(Connection(role.peer), scenario)
    sent_a, sent_b = bytearray(), bytearray()
    out_a, out_b = a.start(), b.start()
    while out_a or out_b:
        data, out_a = b"".join(out_a), []
        sent_a += data
        if data:
            out_b += b.feed(data)
        data, out_b = b"".join(out_b), []
        sent_b += data
        if data:
            out_a += a.feed(data)
    return bytes(sent_a), bytes(sent_b)


def transcripts() -> list[tuple[Role, str, bytes]]:
    """(receiver role, scenario, bytes its peer sent) for every role and scenario."""
    out = []
    for leader in (Role.ORCHESTRATOR, Role.SOURCE_AGENT):
        for scenario in SCENARIOS:
            leader_bytes, follower_bytes = run_session(leader, scenario)
            out.append((leader.peer, scenario, leader_bytes))
            out.append((leader, scenario, follower_bytes))
    return out


def message_offsets(stream: bytes) -> list[int]:
    """Where each message of a well-formed stream starts."""
    offsets, pos = [], 0
    while pos + HEADER_SIZE <= len(stream):
        offsets.append(pos)
        pos += HEADER_SIZE + int.from_bytes(stream[pos + 8 : pos + 12], "big")
    return offsets


# --- mutation -------------------------------------------------------------------------------

_INTERESTING_U32: Final = (
    0, 1, 7, 8, 12, 13, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000,
    32 * 1024, 16 * 1024 * 1024, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
)  # fmt: skip


def mutate(data: bytes, rng: random.Random, corpus: Sequence[bytes]) -> bytes:
    """Apply one to three random mutations, some of them aware of message headers."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        _MUTATORS[rng.randrange(len(_MUTATORS))](buf, rng, corpus)
    return bytes(buf)


def _m_bitflip(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    for _ in range(rng.randint(1, 4)):
        if buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)


def _m_byte(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    if buf:
        buf[rng.randrange(len(buf))] = rng.choice(
            (0, 1, 0x7F, 0x80, 0xFE, 0xFF, rng.randrange(256))
        )


def _m_u32(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    if len(buf) >= 4:
        at = rng.randrange(len(buf) - 3)
        buf[at : at + 4] = rng.choice(_INTERESTING_U32).to_bytes(4, "big")


def _m_header_field(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    # Corrupt a real header: version, type, flags or body length.
    offsets = message_offsets(bytes(buf))
    if not offsets:
        return
    at = rng.choice(offsets)
    field = rng.randrange(4)
    if field == 0:
        buf[at + 4] = rng.choice((0, 2, 0xFF))
    elif field == 1:
        buf[at + 5] = rng.choice((0, 0x14, 0xFF, *range(1, 0x14)))
    elif field == 2:
        buf[at + 6 : at + 8] = rng.choice((1, 0x8000, 0xFFFF)).to_bytes(2, "big")
    else:
        length = int.from_bytes(buf[at + 8 : at + 12], "big")
        new = rng.choice((0, length - 1, length + 1, length * 2, *_INTERESTING_U32))
        buf[at + 8 : at + 12] = (new & 0xFFFFFFFF).to_bytes(4, "big")


def _m_body_length_prefix(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    # Inside a body, overwrite a u16 (string length, counts) with an edge value.
    offsets = message_offsets(bytes(buf))
    if not offsets:
        return
    at = rng.choice(offsets)
    length = int.from_bytes(buf[at + 8 : at + 12], "big")
    if length >= 2:
        pos = at + HEADER_SIZE + rng.randrange(length - 1)
        value = rng.choice((0, 1, 0xFF, 0x100, 0xFFFF, rng.randrange(0x10000)))
        buf[pos : pos + 2] = value.to_bytes(2, "big")


def _m_insert(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    at = rng.randrange(len(buf) + 1)
    buf[at:at] = rng.randbytes(rng.randint(1, 16))


def _m_delete(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    if buf:
        at = rng.randrange(len(buf))
        del buf[at : at + rng.randint(1, 32)]


def _m_duplicate(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    # Repeat or move a whole message: replays and reordering.
    offsets = message_offsets(bytes(buf))
    if len(offsets) < 2:
        return
    i = rng.randrange(len(offsets) - 1)
    chunk = bytes(buf[offsets[i] : offsets[i + 1]])
    if rng.random() < 0.5:
        del buf[offsets[i] : offsets[i + 1]]
    dest = rng.choice(message_offsets(bytes(buf)) or [0])
    buf[dest:dest] = chunk


def _m_truncate(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    if buf:
        del buf[rng.randrange(len(buf)) :]


def _m_splice(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    other = rng.choice(corpus)
    cut, cut2 = rng.randrange(len(buf) + 1), rng.randrange(len(other) + 1)
    buf[cut:] = other[cut2:]


def _m_flood(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    # A big append: garbage, or one message announcing a huge body it then delivers.
    size = rng.choice((70_000, 140_000))
    if rng.random() < 0.5:
        buf += rng.randbytes(size)
    else:
        header = b"NPAS\x01" + bytes((MsgType.FRAMES,)) + b"\x00\x00" + size.to_bytes(4, "big")
        buf += header + bytes(size)


def _raw(t: int, body: bytes) -> bytes:
    return MAGIC + bytes((1, t)) + b"\x00\x00" + len(body).to_bytes(4, "big") + body


def _injectable() -> tuple[bytes, ...]:
    # Whole messages of protocol 1.1, valid and not, to drop in at message boundaries: each
    # field at its edges, messages for NICs or migrations that do not exist, and bodies that
    # only a hand-made encoder would produce.
    out: list[bytes] = []
    for mid in _MIDS:
        good: list[Message] = [
            NicFilter(mid, 0, NicFilterFlag(7), _MCAST, (_MAC0, _MAC1)),
            NicFilter(mid, 1, NicFilterFlag(0)),
            NicFilter(mid, 9, NicFilterFlag.PROMISCUOUS),
            NicFilter(mid, 0, NicFilterFlag(0), (b"\x01" * 6,) * 256, (_MAC0,) * 256),
            Peer(mid, "h" * 255, 65535, "n" * 255),
            Peer(mid, "192.0.2.1", 1, ""),
            UsedIdx(mid, UsedPhase.OBSERVE, ((1, 7),)),
            UsedIdx(mid, UsedPhase.BASELINE, ((0, 1),)),  # not every NIC
            UsedIdx(mid, UsedPhase.OBSERVE, ((5, 1),)),  # not prepared
            UsedIdx(mid, UsedPhase.STOPPED, tuple((i, i) for i in range(64))),
            Hold(mid),
        ]
        good += [UsedIdx(mid, p, ((0, 0), (1, 0xFFFF))) for p in UsedPhase]
        out += [encode_message(m) for m in good]
        m = mid.bytes
        out += [
            _raw(MsgType.NIC_FILTER, m + b"\x00\x00\x08\x00\x00\x00\x00"),  # flags 8
            _raw(MsgType.NIC_FILTER, m + b"\x00\x00\x00\x01\x01" + _MAC0 + b"\x00\x00"),
            _raw(MsgType.NIC_FILTER, m + b"\x00\x00\x00\x00\x00\x00\x01" + _MCAST[0]),
            _raw(MsgType.NIC_FILTER, m + b"\x00\x00\x00\x01\x01" + _MCAST[0] * 257 + bytes(2)),
            _raw(MsgType.PEER, m + b"\x00\x01h\x00\x00\x00\x00"),  # port 0
            _raw(MsgType.PEER, m + b"\x00\x00\x1e\x61\x00\x00"),  # empty host
            _raw(MsgType.PEER, m + b"\x00\x01\xff\x1e\x61\x00\x00"),  # not UTF-8
            _raw(MsgType.PEER, m + b"\x00\x01\n\x1e\x61\x00\x00"),  # not printable
            _raw(MsgType.USED_IDX, m + b"\x00\x00\x00"),  # phase 0
            _raw(MsgType.USED_IDX, m + b"\x06\x00\x00"),  # phase 6
            _raw(MsgType.USED_IDX, m + b"\x02\x00\x02" + bytes(8)),  # nic 0 twice
            _raw(MsgType.USED_IDX, m + b"\x02\x00\x41" + bytes(4 * 65)),  # 65 entries
            _raw(MsgType.HOLD, m + b"\x00"),
        ]
    return tuple(out)


_INJECTABLE: Final = _injectable()


def _m_inject(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    # Insert a 1.1 message (valid or not) at a message boundary, or overwrite one with it.
    offsets = message_offsets(bytes(buf)) or [0]
    i = rng.randrange(len(offsets))
    at = offsets[i]
    msg = rng.choice(_INJECTABLE)
    if rng.random() < 0.3 and i + 1 < len(offsets):
        buf[at : offsets[i + 1]] = msg
    else:
        buf[at:at] = msg


def _m_garbage(buf: bytearray, rng: random.Random, corpus: Sequence[bytes]) -> None:
    buf[:] = rng.randbytes(rng.randint(0, 64))
    if rng.random() < 0.5:
        buf[:4] = b"NPAS"


_MUTATORS: Final[Sequence[Callable[[bytearray, random.Random, Sequence[bytes]], None]]] = (
    _m_bitflip, _m_bitflip, _m_byte, _m_u32, _m_header_field, _m_header_field,
    _m_body_length_prefix, _m_body_length_prefix, _m_insert, _m_delete, _m_duplicate,
    _m_duplicate, _m_truncate, _m_splice, _m_flood, _m_garbage, _m_inject, _m_inject,
)  # fmt: skip


# --- the target -----------------------------------------------------------------------------


class _Outcome:
    __slots__ = ("clean", "events", "remote_error")

    def __init__(self) -> None:
        self.events = 0
        self.remote_error = False
        self.clean = False  # reached ConnectionClosed / PAUSED with no error


def replay(
    role: Role, scenario: str, data: bytes, chunks: Sequence[int], limits: Limits
) -> _Outcome:
    """Feed ``data`` to a fresh ``role`` receiver in pieces of the given sizes, then EOF.

    Raises anything other than RemoteProtocolError, and AssertionError if the buffer limit
    is ever exceeded or the ERROR state does not stick.
    """
    out = _Outcome()
    responder = Responder(Connection(role, limits=limits), scenario)
    conn = responder.conn
    responder.start()
    pieces, pos = [], 0
    for size in chunks:
        if pos >= len(data):
            break
        pieces.append(data[pos : pos + size])
        pos += size
    if pos < len(data):
        pieces.append(data[pos:])
    pieces.append(b"")
    try:
        for piece in pieces:
            responder.feed(piece)
            assert conn.buffered_bytes <= limits.max_buffer_bytes, "buffer limit exceeded"
    except RemoteProtocolError as exc:
        out.remote_error = True
        assert conn.buffered_bytes <= limits.max_buffer_bytes, "buffer limit exceeded"
        try:
            conn.next_event()
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("connection did not stay in ERROR after a remote error") from exc
        if conn.our_state is not State.CLOSED:
            conn.send(Error.from_exception(exc))  # the reply path must always work
    out.events = len(responder.events)
    out.clean = not out.remote_error and conn.next_event() is PAUSED
    return out


class FuzzStats(TypedDict):
    cases: int
    events: int  # events decoded across all cases
    remote_errors: int  # cases that ended in RemoteProtocolError
    clean_closes: int  # cases that ran to ConnectionClosed without error
    unmutated_cases: int  # valid sessions replayed as a control; all must be accepted
    unexpected: int  # anything else: must be 0
    seconds: float
    first_unexpected: str  # traceback of the first unexpected failure, or ""


def run_fuzz(cases: int, seed: int = 0) -> FuzzStats:
    """Run ``cases`` seeded fuzz cases against the decoder and count the outcomes."""
    rng = random.Random(seed)
    corpus = transcripts()
    streams = [t[2] for t in corpus]
    stats = FuzzStats(
        cases=0,
        events=0,
        remote_errors=0,
        clean_closes=0,
        unmutated_cases=0,
        unexpected=0,
        seconds=0.0,
        first_unexpected="",
    )
    started = time.perf_counter()
    for _ in range(cases):
        role, scenario, stream = rng.choice(corpus)
        unmutated = rng.random() < 0.05
        data = stream if unmutated else mutate(stream, rng, streams)
        limits = TIGHT_LIMITS if rng.random() < 0.3 else Limits()
        chunks = _chunking(rng, len(data))
        stats["cases"] += 1
        stats["unmutated_cases"] += unmutated
        try:
            outcome = replay(role, scenario, data, chunks, limits)
            if unmutated and not outcome.clean:
                raise AssertionError(f"valid {scenario} session rejected for {role.name}")
        except Exception:
            stats["unexpected"] += 1
            if not stats["first_unexpected"]:
                stats["first_unexpected"] = traceback.format_exc()
            continue
        stats["events"] += outcome.events
        stats["remote_errors"] += outcome.remote_error
        stats["clean_closes"] += outcome.clean
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return stats


def _chunking(rng: random.Random, size: int) -> list[int]:
    mode = rng.randrange(4)
    if mode == 0:
        return [size]  # all at once (exercises the buffer limit)
    if mode == 1 and size <= 4096:
        return [1] * size  # byte by byte
    return [rng.randint(1, 97) for _ in range(size // 20 + 1)]


# --- atheris --------------------------------------------------------------------------------


def _atheris_main(argv: list[str]) -> None:
    atheris: Any = importlib.import_module("atheris")
    corpus = transcripts()

    def target(data: bytes) -> None:
        if len(data) < 2:
            return
        role, scenario, _ = corpus[data[0] % len(corpus)]
        step = data[1] % 64 + 1
        body = data[2:]
        replay(role, scenario, body, [step] * (len(body) // step + 1), Limits())

    atheris.instrument_all()
    atheris.Setup(argv, target)
    atheris.Fuzz()


def write_seed_corpus(directory: str) -> int:
    """Write the recorded sessions as atheris seeds (selector byte, chunk byte, stream)."""
    import pathlib

    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    corpus = transcripts()
    for i, (_, _, stream) in enumerate(corpus):
        (path / f"seed-{i:02d}").write_bytes(bytes((i, 63)) + stream)
    return len(corpus)


USAGE: Final = """\
usage: python -m netpass.fuzz_wire [CASES [SEED]]   seeded mutation fuzzing (100000 cases, seed 0)
       python -m netpass.fuzz_wire --atheris [libFuzzer flags]
       python -m netpass.fuzz_wire --seed-corpus DIR"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args and args[0] == "--atheris":
        _atheris_main([sys.argv[0], *args[1:]])
        return 0
    if len(args) == 2 and args[0] == "--seed-corpus":
        print(write_seed_corpus(args[1]))
        return 0
    try:
        if len(args) > 2:
            raise ValueError(args)
        cases = int(args[0]) if args else 100_000
        seed = int(args[1]) if len(args) > 1 else 0
    except ValueError:
        print(USAGE, file=sys.stderr)
        return 2
    stats = run_fuzz(cases, seed)
    for key, value in stats.items():
        print(f"{key}: {value}")
    return 1 if stats["unexpected"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
