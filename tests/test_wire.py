"""Tests for netpass.wire: codec round trips, the state machine, limits, errors and fuzzing.

Hypothesis example counts are small by default; set NETPASS_FUZZ_EXAMPLES to run more.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import string
from pathlib import Path
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netpass import fuzz_wire
from netpass.wire import (
    DEFAULT_LIMITS,
    HEADER_SIZE,
    MAGIC,
    NEED_DATA,
    PAUSED,
    PROTOCOL_VERSION,
    SUPPORTED_FEATURES,
    Abort,
    Ack,
    Bye,
    CaptureOn,
    Connection,
    ConnectionClosed,
    Counts,
    End,
    Error,
    ErrorCode,
    Event,
    Feature,
    FrameDigest,
    FrameRecord,
    Frames,
    GiveBack,
    Hello,
    Hold,
    Limits,
    LocalProtocolError,
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
    clock_offset,
    decode_frame_records,
    decode_message,
    encode_frame_record,
    encode_message,
)

EXAMPLES = int(os.environ.get("NETPASS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROUND_TRIP = settings(max_examples=max(EXAMPLES // 3, 20), deadline=None)

MID = UUID("00112233-4455-6677-8899-aabbccddeeff")
MID2 = UUID("00112233-4455-6677-8899-aabbccddee00")
MAC0 = bytes.fromhex("525400123456")
MAC1 = bytes.fromhex("525400654321")
MCAST = bytes.fromhex("01005e0000fb")  # 224.0.0.251 (mDNS)
NICS = (NicSpec(0, "tap0", MAC0, 1), NicSpec(1, "tap1", MAC1, 4))
VNET = bytes(10) + b"\x01\x00"


def eth(payload: bytes, dst: bytes = b"\xff" * 6) -> bytes:
    return dst + MAC0 + b"\x88\xb5" + payload


def rec(payload: bytes = b"hello", vnet: bool = False) -> FrameRecord:
    return FrameRecord(VNET + eth(payload), 12) if vnet else FrameRecord(eth(payload))


# --- helpers --------------------------------------------------------------------------------


def drain(conn: Connection) -> list[Event]:
    events: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is PAUSED:
            return events
        assert isinstance(ev, Event)
        events.append(ev)


def deliver(src: Connection, dst: Connection, msg: Message) -> Event:
    """src sends msg; dst must decode exactly that one event."""
    dst.receive_data(src.send(msg))
    events = drain(dst)
    assert len(events) == 1, events
    return events[0]


def hello_pair(
    leader: Role = Role.SOURCE_AGENT,
    features: Feature = SUPPORTED_FEATURES,
    peer_features: Feature = SUPPORTED_FEATURES,
    limits: Limits = DEFAULT_LIMITS,
    peer_limits: Limits = DEFAULT_LIMITS,
) -> tuple[Connection, Connection]:
    a = Connection(leader, limits=limits)
    b = Connection(leader.peer, limits=peer_limits)
    deliver(a, b, a.make_hello("a-host", features))
    deliver(b, a, b.make_hello("b-host", peer_features))
    return a, b


def capturing_pair(**kw: object) -> tuple[Connection, Connection]:
    a, b = hello_pair(**kw)  # type: ignore[arg-type]
    deliver(a, b, Prepare(MID, "vm1", NICS))
    deliver(b, a, Prepared(MID))
    deliver(a, b, CaptureOn(MID))
    deliver(b, a, Ack(MID, MsgType.CAPTURE_ON))
    return a, b


def expect_remote(conn: Connection, data: bytes, code: ErrorCode | None = None) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(data)
        drain(conn)
    if code is not None:
        assert info.value.error_code == code, str(info.value)
    assert conn.their_state is State.ERROR
    with pytest.raises(RemoteProtocolError):  # the failure sticks
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"more")
    return str(info.value)


def raw_message(t: int, body: bytes, version: int = 1, flags: int = 0) -> bytes:
    return (
        MAGIC + bytes((version, t)) + flags.to_bytes(2, "big") + len(body).to_bytes(4, "big") + body
    )


# --- one sample of every message ------------------------------------------------------------

SAMPLES: list[Message] = [
    Hello(role=Role.SOURCE_AGENT, identity="src-host"),
    Hello(Role.AGENT, "agent ü", Feature.COUNTS, (1, 7), 32 * 1024, 1, 1500, 0),
    Prepare(MID, "vm1", NICS),
    Prepared(MID),
    CaptureOn(MID),
    Ack(MID, MsgType.CAPTURE_ON),
    Ack(MID, MsgType.END),
    Ack(MID, MsgType.ABORT),
    Ack(MID, MsgType.GIVE_BACK),
    VmStarted(MID, 1_700_000_000_123_456_789),
    Frames(MID, 1, 2**40, (rec(b"a"), rec(b"bb", vnet=True), rec(bytes(1500)))),
    End(MID, (NicSummary(0, 3, bytes(32)), NicSummary(1, 2**64 - 1, b"\xff" * 32))),
    Abort(MID, "migration cancelled"),
    Abort(MID),
    GiveBack(MID, "destination VM failed"),
    Counts(MID, (("captured", 10), ("injected", 2**64 - 1))),
    Counts(MID, ()),
    Ping(123),
    Pong(1, 2, 3),
    Error(ErrorCode.UNSUPPORTED_VERSION, "nope"),
    Error(0xFFFF, ""),
    Bye(),
    NicFilter(MID, 0, NicFilterFlag.ALL_MULTICAST, (MCAST, b"\xff" * 6), (MAC1,)),
    NicFilter(MID, 1, NicFilterFlag(0)),
    NicFilter(MID, 2, NicFilterFlag(7), (MCAST,) * 256, (MAC0,) * 256),
    Peer(MID, "dest-host", 7440, "dest-agent"),
    Peer(MID, "h" * 255, 65535, "n" * 255),
    Peer(MID, "2001:db8::1", 1, ""),
    UsedIdx(MID, UsedPhase.BASELINE, ((0, 0), (1, 65535))),
    UsedIdx(MID, UsedPhase.STOPPED, ()),
    UsedIdx(MID, UsedPhase.OBSERVE, tuple((i, i) for i in range(64))),
    Hold(MID),
]


def test_every_message_type_has_a_sample() -> None:
    assert {m.TYPE for m in SAMPLES} == set(MsgType)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_samples(msg: Message) -> None:
    data = encode_message(msg)
    assert data[:4] == MAGIC and data[5] == msg.TYPE
    assert int.from_bytes(data[8:12], "big") == len(data) - HEADER_SIZE
    assert decode_message(data) == msg


# --- hypothesis strategies for every message ------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
printable = st.text(min_size=1, max_size=40).filter(lambda s: s.isprintable())
texts = st.text(max_size=60)
taps = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=15).filter(
    lambda s: s not in (".", "..")
)
macs = st.binary(min_size=6, max_size=6).map(lambda b: bytes([(b[0] & 0xFE) | 0x02]) + b[1:])
records = st.builds(
    lambda vnet, payload: FrameRecord(vnet + payload, len(vnet)),
    st.binary(max_size=32),
    st.binary(min_size=14, max_size=120),
)
counter_names = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=64)
multicast_macs = st.binary(min_size=6, max_size=6).map(lambda b: bytes([b[0] | 1]) + b[1:])
unicast_macs = st.binary(min_size=6, max_size=6).map(lambda b: bytes([b[0] & 0xFE]) + b[1:])

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello,
        role=st.sampled_from(Role),
        identity=printable,
        features=u32.map(Feature),
        version=st.tuples(st.integers(1, 255), st.integers(0, 255)),
    ),
    st.builds(
        Prepare,
        st.uuids(),
        printable,
        st.lists(
            st.builds(NicSpec, u16, taps, macs, st.integers(1, 0xFFFF)),
            min_size=1,
            max_size=6,
            unique_by=(lambda n: n.nic_id, lambda n: n.tap),
        ).map(tuple),
    ),
    st.builds(Prepared, st.uuids()),
    st.builds(CaptureOn, st.uuids()),
    st.builds(
        Ack,
        st.uuids(),
        st.sampled_from([MsgType.CAPTURE_ON, MsgType.END, MsgType.ABORT, MsgType.GIVE_BACK]),
    ),
    st.builds(VmStarted, st.uuids(), u64),
    st.builds(
        Frames, st.uuids(), u16, st.integers(0, 2**63), st.lists(records, min_size=1, max_size=8)
    ),
    st.builds(
        End,
        st.uuids(),
        st.lists(
            st.builds(NicSummary, u16, u64, st.binary(min_size=32, max_size=32)),
            min_size=1,
            max_size=5,
            unique_by=lambda s: s.nic_id,
        ),
    ),
    st.builds(Abort, st.uuids(), texts),
    st.builds(GiveBack, st.uuids(), texts),
    st.builds(
        Counts,
        st.uuids(),
        st.lists(st.tuples(counter_names, u64), max_size=10, unique_by=lambda c: c[0]),
    ),
    st.builds(Ping, u64),
    st.builds(Pong, u64, u64, u64),
    st.builds(Error, u16, texts),
    st.just(Bye()),
    st.builds(
        NicFilter,
        st.uuids(),
        u16,
        st.integers(0, 7).map(NicFilterFlag),
        st.lists(multicast_macs, max_size=8).map(tuple),
        st.lists(unicast_macs, max_size=8).map(tuple),
    ),
    st.builds(
        Peer,
        st.uuids(),
        printable,
        st.integers(1, 0xFFFF),
        st.text(max_size=40).filter(lambda s: s.isprintable()),
    ),
    st.builds(
        UsedIdx,
        st.uuids(),
        st.sampled_from(UsedPhase),
        st.lists(st.tuples(u16, u16), max_size=64, unique_by=lambda e: e[0]).map(tuple),
    ),
    st.builds(Hold, st.uuids()),
)


@ROUND_TRIP
@given(messages)
def test_round_trip_generated(msg: Message) -> None:
    assert decode_message(encode_message(msg)) == msg


@ROUND_TRIP
@given(messages, st.integers(0, 10_000))
def test_decode_rejects_truncated_or_extended_bodies(msg: Message, cut: int) -> None:
    data = encode_message(msg)
    short = data[: cut % len(data)]
    with pytest.raises(RemoteProtocolError):
        decode_message(short)
    # Extra bytes that the header's length does not cover.
    with pytest.raises(RemoteProtocolError):
        decode_message(data + b"\x00")
    # Extra bytes that the header does cover: trailing garbage inside the body.
    if msg.TYPE is not MsgType.FRAMES:
        grown = data[:8] + (len(data) - HEADER_SIZE + 1).to_bytes(4, "big") + data[12:] + b"\0"
        with pytest.raises(RemoteProtocolError):
            decode_message(grown)


# --- whole sessions -------------------------------------------------------------------------

TRANSCRIPTS = fuzz_wire.transcripts()


@pytest.mark.parametrize(
    ("role", "scenario", "stream"),
    TRANSCRIPTS,
    ids=[f"{r.name}-{s}" for r, s, _ in TRANSCRIPTS],
)
def test_recorded_sessions_replay_whole_and_byte_by_byte(
    role: Role, scenario: str, stream: bytes
) -> None:
    whole = fuzz_wire.Responder(Connection(role), scenario)
    whole.start()
    whole.feed(stream)
    whole.feed(b"")
    assert isinstance(whole.events[0], Hello)
    assert isinstance(whole.events[-1], ConnectionClosed) and whole.events[-1].clean
    assert whole.conn.their_state is State.CLOSED
    assert whole.conn.next_event() is PAUSED

    bytewise = fuzz_wire.Responder(Connection(role), scenario)
    bytewise.start()
    for i in range(len(stream)):
        bytewise.feed(stream[i : i + 1])
        assert bytewise.conn.buffered_bytes < HEADER_SIZE + 2000
    bytewise.feed(b"")
    assert bytewise.events == whole.events


def test_recorded_control_session_confirms_the_hold() -> None:
    """The 1.2 control-channel transcript (what the fuzzer mutates) carries ACK(HOLD)."""
    orch = fuzz_wire.Responder(Connection(Role.ORCHESTRATOR), "complete")
    orch.start()
    stream = next(s for r, sc, s in TRANSCRIPTS if r is Role.ORCHESTRATOR and sc == "complete")
    orch.feed(stream)
    assert Ack(_mid_of(orch), MsgType.HOLD) in orch.events


def _mid_of(r: fuzz_wire.Responder) -> UUID:
    return next(e.migration_id for e in r.events if isinstance(e, Prepared))


def test_frame_channel_session_states_and_summaries() -> None:
    src, dst = hello_pair()
    assert (src.our_state, src.their_state) == (State.IDLE, State.IDLE)
    assert (
        src.negotiated_version == PROTOCOL_VERSION and src.negotiated_features == SUPPORTED_FEATURES
    )
    assert dst.peer_hello is not None and dst.peer_hello.identity == "a-host"
    deliver(src, dst, Prepare(MID, "vm1", NICS))
    assert (src.our_state, dst.their_state) == (State.PREPARING, State.PREPARING)
    deliver(dst, src, Prepared(MID))
    assert dst.our_state is State.PREPARED
    deliver(src, dst, CaptureOn(MID))
    deliver(dst, src, Ack(MID, MsgType.CAPTURE_ON))
    assert (src.our_state, dst.our_state) == (State.CAPTURING, State.CAPTURING)
    frames = [rec(b"one"), rec(b"two", vnet=True), rec(b"three")]
    for msg in src.batch_frames(0, frames):
        assert deliver(src, dst, msg) == msg
    deliver(src, dst, Frames(MID, 1, 0, (rec(b"x"),)))
    deliver(dst, src, VmStarted(MID, 5))
    assert src.next_frame_index(0) == dst.next_frame_index(0) == 3
    end = End(MID, src.frame_summaries())
    digest = FrameDigest()
    digest.update_many(frames)
    assert end.nics[0] == NicSummary(0, 3, digest.digest())
    assert end.nics[1].frame_count == 1
    assert deliver(src, dst, end) == end
    assert src.our_state is State.CLOSING
    deliver(dst, src, Ack(MID, MsgType.END))
    assert (src.our_state, dst.our_state) == (State.IDLE, State.IDLE)
    assert dst.frame_summaries() == end.nics
    deliver(src, dst, Bye())
    dst.receive_data(b"")
    assert drain(dst) == [ConnectionClosed(clean=True)]
    assert dst.their_state is State.CLOSED and dst.next_event() is PAUSED


def test_two_migrations_in_a_row_and_counts_for_the_previous_one() -> None:
    leader, follower = capturing_pair(leader=Role.ORCHESTRATOR)
    deliver(follower, leader, End(MID, (NicSummary(0, 1, bytes(32)), NicSummary(1, 0, bytes(32)))))
    deliver(leader, follower, Ack(MID, MsgType.END))
    deliver(leader, follower, Prepare(MID2, "vm1", NICS))
    assert leader.migration_id == follower.migration_id == MID2
    # A late COUNTS for the first migration is still fine.
    late = deliver(follower, leader, Counts(MID, (("captured", 1),)))
    assert isinstance(late, Counts) and late.as_dict() == {"captured": 1}
    deliver(follower, leader, Prepared(MID2))
    deliver(leader, follower, Abort(MID2, "changed my mind"))
    deliver(follower, leader, Ack(MID2, MsgType.ABORT))
    assert leader.our_state is follower.our_state is State.IDLE
    with pytest.raises(LocalProtocolError, match="reuses a migration id"):
        leader.send(Prepare(MID, "vm1", NICS))


# --- limits ---------------------------------------------------------------------------------


def test_limits_validation() -> None:
    Limits()
    fuzz_wire.TIGHT_LIMITS  # noqa: B018 - constructing it validated it
    with pytest.raises(ValueError, match="max_message_bytes"):
        Limits(max_message_bytes=1024)
    with pytest.raises(ValueError, match="max_buffer_bytes"):
        Limits(max_buffer_bytes=1024)
    with pytest.raises(ValueError, match="max_frames_per_batch"):
        Limits(max_frames_per_batch=0)
    with pytest.raises(ValueError, match="one maximal frame"):
        Limits(max_message_bytes=40_000, max_frame_bytes=65535)


def test_oversize_header_is_refused_before_the_body_arrives() -> None:
    tight = fuzz_wire.TIGHT_LIMITS
    _, dst = capturing_pair(peer_limits=tight)
    header = raw_message(MsgType.FRAMES, b"")[:8] + (tight.max_message_bytes).to_bytes(4, "big")
    msg = expect_remote(dst, header, ErrorCode.LIMIT_EXCEEDED)
    assert "exceeds" in msg and dst.buffered_bytes == HEADER_SIZE


@pytest.mark.parametrize(
    ("t", "length"),
    [(MsgType.PING, 9), (MsgType.PING, 7), (MsgType.BYE, 1), (MsgType.HELLO, 300)],
)
def test_fixed_and_bounded_body_sizes(t: MsgType, length: int) -> None:
    conn = Connection(Role.DEST_AGENT)
    header = raw_message(t, b"")[:8] + length.to_bytes(4, "big")
    expect_remote(conn, header)


def test_buffer_limit_is_never_exceeded() -> None:
    tight = fuzz_wire.TIGHT_LIMITS
    conn = Connection(Role.DEST_AGENT, limits=tight)
    conn.receive_data(b"N" * 100)
    with pytest.raises(RemoteProtocolError, match="max_buffer_bytes") as info:
        conn.receive_data(b"x" * tight.max_buffer_bytes)
    assert info.value.error_code == ErrorCode.LIMIT_EXCEEDED
    assert conn.buffered_bytes == 100 and conn.their_state is State.ERROR


def test_many_messages_in_one_read_are_fine_when_drained() -> None:
    src, dst = capturing_pair(peer_limits=fuzz_wire.TIGHT_LIMITS)
    batches = src.batch_frames(0, [rec(bytes(1000)) for _ in range(200)])
    assert len(batches) > 1 and all(len(b.frames) <= 16 for b in batches)
    data = b"".join(src.send(b) for b in batches)
    assert len(data) > fuzz_wire.TIGHT_LIMITS.max_buffer_bytes
    received: list[Event] = []
    for i in range(0, len(data), 4096):
        dst.receive_data(data[i : i + 4096])
        received += drain(dst)
        assert dst.buffered_bytes <= fuzz_wire.TIGHT_LIMITS.max_buffer_bytes
    assert received == batches


def test_frames_per_batch_and_frame_size_limits() -> None:
    tight = fuzz_wire.TIGHT_LIMITS
    src, dst = capturing_pair(peer_limits=tight)
    # The source refuses to send what the destination announced it would refuse.
    with pytest.raises(LocalProtocolError, match="max_frames_per_batch") as info:
        src.send(Frames(MID, 0, 0, tuple(rec() for _ in range(17))))
    assert info.value.error_code == ErrorCode.LIMIT_EXCEEDED
    src2, _ = capturing_pair(peer_limits=tight)
    with pytest.raises(LocalProtocolError, match="max_frame_bytes"):
        src2.send(Frames(MID, 0, 0, (rec(bytes(3000)),)))
    # And the destination refuses it if sent anyway.
    body = MID.bytes + (0).to_bytes(2, "big") + bytes(8) + (17).to_bytes(4, "big")
    expect_remote(dst, raw_message(MsgType.FRAMES, body + encode_frame_record(rec()) * 17))
    _, dst2 = capturing_pair(peer_limits=tight)
    big = encode_frame_record(rec(bytes(3000)))
    body = MID.bytes + (0).to_bytes(2, "big") + bytes(8) + (1).to_bytes(4, "big")
    expect_remote(dst2, raw_message(MsgType.FRAMES, body + big), ErrorCode.LIMIT_EXCEEDED)


def test_hello_cannot_announce_more_than_our_limits() -> None:
    conn = Connection(Role.AGENT, limits=fuzz_wire.TIGHT_LIMITS)
    with pytest.raises(LocalProtocolError, match="limits"):
        conn.send(Hello(Role.AGENT, "agent"))  # default limits are larger
    assert conn.our_state is State.ERROR


# --- malformed input ------------------------------------------------------------------------


def _hello_bytes(role: Role = Role.SOURCE_AGENT) -> bytes:
    return encode_message(Hello(role, "src-host"))


@pytest.mark.parametrize(
    ("data", "code", "text"),
    [
        (b"XPAS" + _hello_bytes()[4:], ErrorCode.MALFORMED, "magic"),
        (raw_message(0x42, b""), ErrorCode.UNKNOWN_MESSAGE, "unknown message type 0x42"),
        (raw_message(0, b""), ErrorCode.UNKNOWN_MESSAGE, "unknown"),
        (raw_message(MsgType.BYE, b"", flags=1), ErrorCode.MALFORMED, "flags"),
        (_hello_bytes()[:-1] + b"\xff", ErrorCode.MALFORMED, "UTF-8"),
        (_hello_bytes(Role.AGENT), ErrorCode.BAD_ROLE, "HELLO from AGENT"),
        (
            raw_message(MsgType.HELLO, _hello_bytes()[12:14] + b"\x09" + _hello_bytes()[15:]),
            ErrorCode.MALFORMED,
            "unknown role 9",
        ),
        (raw_message(MsgType.PING, bytes(8)), ErrorCode.UNEXPECTED_MESSAGE, "before HELLO"),
        (raw_message(MsgType.HELLO, bytes(24)), ErrorCode.MALFORMED, None),
    ],
)
def test_malformed_input(data: bytes, code: ErrorCode, text: str | None) -> None:
    conn = Connection(Role.DEST_AGENT)
    conn.send(conn.make_hello("dst"))
    msg = expect_remote(conn, data, code)
    if text:
        assert text in msg
    # After a remote error only ERROR may be sent, and it may always be sent.
    with pytest.raises(LocalProtocolError):
        conn.send(Ping(1))
    reply = conn.send(Error(code, msg[:100]))
    assert decode_message(reply) == Error(code, msg[:100])
    assert conn.our_state is State.CLOSED


def test_length_prefixes_are_bounds_checked() -> None:
    good = encode_message(Abort(MID, "why"))
    body = bytearray(good[HEADER_SIZE:])
    body[16:18] = (500).to_bytes(2, "big")  # reason length beyond the body
    with pytest.raises(RemoteProtocolError, match="truncated in reason"):
        decode_message(raw_message(MsgType.ABORT, bytes(body)))
    prep = bytearray(encode_message(Prepare(MID, "vm1", NICS))[HEADER_SIZE:])
    prep[21:23] = (65).to_bytes(2, "big")  # nic count over MAX_NICS
    with pytest.raises(RemoteProtocolError, match="at most 64"):
        decode_message(raw_message(MsgType.PREPARE, bytes(prep)))


@pytest.mark.parametrize(
    ("msg", "text"),
    [
        (Prepare(MID, "vm1", (NicSpec(0, "tap/0", MAC0),)), "invalid"),
        (Prepare(MID, "vm1", (NicSpec(0, "tap0", b"\x01" + MAC0[1:]),)), "unicast"),
        (Prepare(MID, "vm1", (NicSpec(0, "tap0", MAC0), NicSpec(0, "tap1", MAC1))), "nic_id"),
        (Prepare(MID, "vm\n1", NICS), "non-printable"),
        (Prepare(MID, "vm1", ()), "1..64"),
        (Frames(MID, 0, 0, ()), "at least one"),
        (Frames(MID, 0, 0, (FrameRecord(b"short"),)), "shorter"),
        (Frames(MID, 0, 0, (FrameRecord(eth(b"x"), 99),)), "exceeds"),
        (Counts(MID, (("bad name", 1),)), "letters"),
        (Counts(MID, (("a", 1), ("a", 2))), "repeats"),
        (End(MID, (NicSummary(0, 1, b"short"),)), "32 bytes"),
        (Error(70000, ""), "u16"),
        (Hello(Role.AGENT, ""), "identity"),
        (Hello(Role.AGENT, "x", version=(0, 1)), "major"),
        (Ack(MID, MsgType.PING), "cannot acknowledge"),
    ],
)
def test_encoder_refuses_invalid_fields(msg: Message, text: str) -> None:
    with pytest.raises(LocalProtocolError, match=text):
        encode_message(msg)


def test_truncated_at_eof() -> None:
    data = _hello_bytes()
    for cut in (1, HEADER_SIZE - 1, HEADER_SIZE, len(data) - 1):
        conn = Connection(Role.DEST_AGENT)
        conn.receive_data(data[:cut])
        assert conn.next_event() is NEED_DATA
        with pytest.raises(RemoteProtocolError, match="stream ended inside"):
            conn.receive_data(b"")
            conn.next_event()
        assert conn.their_state is State.ERROR


def test_eof_at_a_boundary_without_bye_is_an_unclean_close() -> None:
    conn = Connection(Role.DEST_AGENT)
    conn.receive_data(_hello_bytes())
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), Hello)
    assert conn.next_event() == ConnectionClosed(clean=False)
    assert conn.next_event() is PAUSED
    assert conn.their_state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"late")


# --- out-of-order input ---------------------------------------------------------------------


def test_data_after_bye() -> None:
    src, dst = hello_pair()
    deliver(src, dst, Bye())
    expect_remote(dst, encode_message(Ping(1)), ErrorCode.UNEXPECTED_MESSAGE)


def _peer_sends(sender_role: Role, setup: str, msg: Message) -> tuple[Connection, str, int]:
    """Drive a pair to ``setup``; inject ``msg`` as if the peer had sent it; return the error."""
    leader_role = sender_role if sender_role.leads else sender_role.peer
    if setup == "hello":
        leader, follower = hello_pair(leader_role)
    elif setup == "prepared":
        leader, follower = hello_pair(leader_role)
        deliver(leader, follower, Prepare(MID, "vm1", NICS))
        deliver(follower, leader, Prepared(MID))
    else:
        leader, follower = capturing_pair(leader=leader_role)
    receiver = follower if sender_role.leads else leader
    with pytest.raises(RemoteProtocolError) as info:
        receiver.receive_data(encode_message(msg))
        drain(receiver)
    return receiver, str(info.value), info.value.error_code


@pytest.mark.parametrize(
    ("sender", "setup", "msg", "code", "text"),
    [
        (Role.DEST_AGENT, "hello", Prepare(MID, "vm1", NICS), 5, "may not send PREPARE"),
        (Role.SOURCE_AGENT, "hello", Prepared(MID), 5, "may not send PREPARED"),
        (Role.SOURCE_AGENT, "hello", CaptureOn(MID), 5, "not the current one"),
        (Role.SOURCE_AGENT, "prepared", Frames(MID, 0, 0, (rec(),)), 5, "before CAPTURE_ON"),
        (Role.SOURCE_AGENT, "prepared", CaptureOn(MID2), 5, "not the current one"),
        (Role.SOURCE_AGENT, "capturing", CaptureOn(MID), 5, "twice"),
        (Role.SOURCE_AGENT, "capturing", Frames(MID, 0, 1, (rec(),)), 8, "expected 0"),
        (Role.SOURCE_AGENT, "capturing", Frames(MID, 7, 0, (rec(),)), 5, "not prepared"),
        (Role.SOURCE_AGENT, "capturing", End(MID, (NicSummary(0, 0, bytes(32)),)), 1, "lists"),
        (
            Role.SOURCE_AGENT,
            "capturing",
            End(MID, (NicSummary(0, 0, bytes(32)), NicSummary(1, 0, bytes(32)))),
            8,
            "different digest",
        ),
        (Role.SOURCE_AGENT, "capturing", Bye(), 5, "ABORT it first"),
        (Role.SOURCE_AGENT, "capturing", Prepare(MID2, "vm", NICS), 5, "is open"),
        (Role.SOURCE_AGENT, "capturing", VmStarted(MID, 1), 5, "may not send VM_STARTED"),
        (Role.SOURCE_AGENT, "capturing", Pong(1, 2, 3), 5, "without an unanswered PING"),
        (Role.DEST_AGENT, "capturing", Ack(MID, MsgType.END), 5, "never sent"),
        (Role.DEST_AGENT, "capturing", Ack(MID, MsgType.GIVE_BACK), 5, "may not ACK"),
        (Role.DEST_AGENT, "prepared", GiveBack(MID), 5, "before capture was armed"),
        (Role.DEST_AGENT, "capturing", Counts(MID2, ()), 5, "unknown migration"),
        (Role.ORCHESTRATOR, "prepared", VmStarted(MID, 1), 5, "before capture was armed"),
        (Role.AGENT, "capturing", Frames(MID, 0, 0, (rec(),)), 5, "may not send FRAMES"),
    ],
)
def test_out_of_order_input(sender: Role, setup: str, msg: Message, code: int, text: str) -> None:
    receiver, message, error_code = _peer_sends(sender, setup, msg)
    assert text in message
    assert error_code == code
    assert receiver.their_state is State.ERROR


def test_features_must_be_negotiated() -> None:
    # The source implements VNET_HDR and COUNTS, the destination only COUNTS.
    src, dst = capturing_pair(peer_features=Feature.COUNTS)
    assert src.negotiated_features == dst.negotiated_features == Feature.COUNTS
    with pytest.raises(LocalProtocolError, match="VNET_HDR") as info:
        src.send(Frames(MID, 0, 0, (rec(vnet=True),)))
    assert info.value.error_code == ErrorCode.FEATURE_NOT_NEGOTIATED
    expect_remote(
        dst, encode_message(Frames(MID, 0, 0, (rec(vnet=True),))), ErrorCode.FEATURE_NOT_NEGOTIATED
    )
    src2, dst2 = capturing_pair(features=Feature.VNET_HDR)
    assert not dst2.can_send(Counts(MID, ()))
    expect_remote(src2, encode_message(Counts(MID, ())), ErrorCode.FEATURE_NOT_NEGOTIATED)


def test_unknown_peer_feature_bits_are_ignored() -> None:
    a = Connection(Role.AGENT)
    a.send(a.make_hello("agent"))
    peer = Hello(Role.ORCHESTRATOR, "orch", Feature(0xFFFFFFFF))
    a.receive_data(encode_message(peer))
    assert drain(a) == [peer]
    assert a.negotiated_features == SUPPORTED_FEATURES


def test_pings_pair_with_pongs_in_order() -> None:
    a, b = hello_pair()
    deliver(a, b, Ping(10))
    deliver(a, b, Ping(20))
    with pytest.raises(LocalProtocolError, match="oldest"):
        b.send(Pong(20, 0, 0))
    a2, b2 = hello_pair()
    deliver(a2, b2, Ping(10))
    pong = deliver(b2, a2, Pong(10, 1_000_000_050, 1_000_000_060))
    assert isinstance(pong, Pong)
    sample = clock_offset(pong.t1_ns, pong.t2_ns, pong.t3_ns, 110)
    assert sample.delay_ns == 90
    for i in range(16):
        deliver(a2, b2, Ping(i))
    with pytest.raises(LocalProtocolError, match="unanswered"):
        a2.send(Ping(99))


# --- local misuse ---------------------------------------------------------------------------


def test_local_misuse() -> None:
    conn = Connection(Role.DEST_AGENT)
    with pytest.raises(LocalProtocolError, match="before HELLO"):
        conn.send(Ping(1))
    assert conn.our_state is State.ERROR
    with pytest.raises(LocalProtocolError, match="already failed"):
        conn.send(conn.make_hello("dst"))
    conn.send(Error(ErrorCode.INTERNAL, "giving up"))  # ERROR is always allowed
    with pytest.raises(LocalProtocolError):
        conn.send(Error(ErrorCode.INTERNAL, "twice"))

    with pytest.raises(LocalProtocolError, match="HELLO from SOURCE_AGENT"):
        Connection(Role.DEST_AGENT).send(Hello(Role.SOURCE_AGENT, "x"))
    with pytest.raises(LocalProtocolError, match="newer minor"):
        Connection(Role.AGENT).send(Hello(Role.AGENT, "x", version=(1, 9)))
    with pytest.raises(LocalProtocolError, match="unknown features"):
        Connection(Role.AGENT).send(Hello(Role.AGENT, "x", Feature(1 << 7)))

    src, dst = capturing_pair()
    with pytest.raises(LocalProtocolError, match="may not send PREPARED"):
        src.send(Prepared(MID))
    with pytest.raises(LocalProtocolError, match="may not send FRAMES"):
        dst.send(Frames(MID, 0, 0, (rec(),)))
    with pytest.raises(LocalProtocolError):
        dst.send(Bye())  # migration still open
    with pytest.raises(LocalProtocolError, match="no migration"):
        Connection(Role.SOURCE_AGENT).frame_summaries()
    with pytest.raises(LocalProtocolError, match="not part of"):
        src.batch_frames(9, [rec()])


def test_can_send_has_no_side_effects() -> None:
    src, _ = capturing_pair()
    assert not src.can_send(Prepared(MID))
    assert src.our_state is State.CAPTURING
    assert src.can_send(Frames(MID, 0, 0, (rec(),)))
    assert not src.can_send(Frames(MID, 0, 5, (rec(),)))
    assert src.next_frame_index(0) == 0


def test_end_must_match_the_frames_sent() -> None:
    src, _ = capturing_pair()
    src.send(Frames(MID, 0, 0, (rec(),)))
    wrong = End(MID, (NicSummary(0, 2, bytes(32)), NicSummary(1, 0, bytes(32))))
    with pytest.raises(LocalProtocolError, match="claims 2 frames, but 1") as info:
        src.send(wrong)
    assert info.value.error_code == ErrorCode.INTEGRITY


# --- crossing messages ----------------------------------------------------------------------


def test_abort_crossing_prepared() -> None:
    leader, follower = hello_pair()
    deliver(leader, follower, Prepare(MID, "vm1", NICS))
    to_follower = leader.send(Abort(MID, "cancelled"))
    to_leader = follower.send(Prepared(MID))  # in flight when the ABORT was sent
    leader.receive_data(to_leader)
    assert drain(leader) == [Prepared(MID)]  # legal, delivered; the app ignores it
    assert leader.our_state is State.CLOSING
    follower.receive_data(to_follower)
    assert drain(follower) == [Abort(MID, "cancelled")]
    # Having received ABORT, the follower may only acknowledge it.
    assert not follower.can_send(Ack(MID, MsgType.CAPTURE_ON))
    assert not follower.can_send(Abort(MID))
    deliver(follower, leader, Ack(MID, MsgType.ABORT))
    assert leader.our_state is follower.our_state is State.IDLE
    deliver(leader, follower, Prepare(MID2, "vm1", NICS))
    with pytest.raises(LocalProtocolError, match="only ACK"):
        _follower_that_received_abort().send(Prepared(MID))


def _follower_that_received_abort() -> Connection:
    leader, follower = hello_pair()
    deliver(leader, follower, Prepare(MID, "vm1", NICS))
    deliver(leader, follower, Abort(MID))
    return follower


def test_follower_bye_crossing_prepare_is_not_blamed() -> None:
    leader, follower = hello_pair()
    prepare = leader.send(Prepare(MID, "vm1", NICS))
    leader.receive_data(follower.send(Bye()))  # the follower had not seen the PREPARE
    assert drain(leader) == [Bye()]
    follower.receive_data(prepare)
    assert drain(follower) == [Prepare(MID, "vm1", NICS)]
    # Once the follower has answered, leaving without closing the migration is a violation.
    leader, follower = hello_pair()
    deliver(leader, follower, Prepare(MID, "vm1", NICS))
    deliver(follower, leader, Prepared(MID))
    expect_remote(leader, raw_message(MsgType.BYE, b""), ErrorCode.UNEXPECTED_MESSAGE)


def test_crossing_aborts_need_no_ack() -> None:
    leader, follower = capturing_pair()
    a, b = leader.send(Abort(MID, "x")), follower.send(Abort(MID, "y"))
    leader.receive_data(b)
    follower.receive_data(a)
    drain(leader), drain(follower)
    assert leader.our_state is follower.our_state is State.IDLE
    assert not follower.can_send(Ack(MID, MsgType.ABORT))
    deliver(leader, follower, Bye())


def test_end_crossing_give_back() -> None:
    src, dst = capturing_pair()
    deliver(src, dst, Frames(MID, 0, 0, (rec(),)))
    end = src.send(End(MID, src.frame_summaries()))
    give_back = dst.send(GiveBack(MID, "dest VM died"))
    src.receive_data(give_back)
    dst.receive_data(end)
    assert isinstance(drain(src)[0], GiveBack) and isinstance(drain(dst)[0], End)
    assert src.our_state is dst.our_state is State.IDLE
    assert not src.can_send(Ack(MID, MsgType.GIVE_BACK))


# --- versions -------------------------------------------------------------------------------


def test_unsupported_major_version() -> None:
    conn = Connection(Role.DEST_AGENT)
    conn.send(conn.make_hello("dst"))
    v2 = bytearray(_hello_bytes())
    v2[4] = 2
    v2[12:14] = b"\x02\x00"
    text = expect_remote(conn, bytes(v2), ErrorCode.UNSUPPORTED_VERSION)
    assert "2.x" in text and "1.x" in text
    reply = decode_message(conn.send(Error.from_exception(RemoteProtocolError(text, 3))))
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNSUPPORTED_VERSION


def test_error_from_another_major_version_is_still_understood() -> None:
    conn = Connection(Role.SOURCE_AGENT)
    conn.send(conn.make_hello("src"))
    body = encode_message(Error(ErrorCode.UNSUPPORTED_VERSION, "I speak 2.x"))[HEADER_SIZE:]
    conn.receive_data(raw_message(MsgType.ERROR, body, version=2))
    assert drain(conn) == [Error(ErrorCode.UNSUPPORTED_VERSION, "I speak 2.x")]
    assert conn.their_state is State.CLOSED


def test_minor_versions_negotiate_down() -> None:
    conn = Connection(Role.AGENT)
    conn.send(conn.make_hello("agent"))
    assert conn.negotiated_version is None and conn.negotiated_features is None
    conn.receive_data(encode_message(Hello(Role.ORCHESTRATOR, "orch", version=(1, 5))))
    drain(conn)
    assert PROTOCOL_VERSION == (1, 2)
    assert conn.negotiated_version == (1, 2)
    assert conn.negotiated_features == SUPPORTED_FEATURES


# --- protocol 1.1: the switchover messages ---------------------------------------------------

SWITCHOVER_MSGS: list[Message] = [
    NicFilter(MID, 0, NicFilterFlag(0)),
    Peer(MID, "dest-host", 7440, ""),
    UsedIdx(MID, UsedPhase.OBSERVE, ()),
    Hold(MID),
]


@pytest.mark.parametrize(
    ("msg", "code", "text"),
    [
        (NicFilter("mid", 0, NicFilterFlag(0)), 1, "migration_id must be a uuid.UUID"),  # type: ignore[arg-type]
        (NicFilter(MID, 0x10000, NicFilterFlag(0)), 1, "nic_id must be a u16"),
        (NicFilter(MID, 0, NicFilterFlag(8)), 1, "flags has unknown bits 0x08"),
        (NicFilter(MID, 0, 0x100), 1, "flags must be a u8"),  # type: ignore[arg-type]
        (NicFilter(MID, 0, True), 1, "flags must be a u8"),  # type: ignore[arg-type]
        (
            NicFilter(MID, 0, NicFilterFlag(0), (MAC0,)),
            1,
            "multicast MAC 0 (52:54:00:12:34:56) lacks",
        ),
        (
            NicFilter(MID, 0, NicFilterFlag(0), (), (MAC0, MCAST)),
            1,
            "unicast MAC 1 (01:00:5e:00:00:fb) has",
        ),
        (NicFilter(MID, 0, NicFilterFlag(0), (MCAST[:5],)), 1, "multicast MAC 0 must be 6 bytes"),
        (NicFilter(MID, 0, NicFilterFlag(0), (bytearray(MCAST),)), 1, "must be 6 bytes"),  # type: ignore[arg-type]
        (NicFilter(MID, 0, NicFilterFlag(0), (MCAST,) * 257), 6, "257 multicast MACs; at most 256"),
        (
            NicFilter(MID, 0, NicFilterFlag(0), (), (MAC0,) * 257),
            6,
            "257 unicast MACs; at most 256",
        ),
        (Peer(MID, "", 1, ""), 1, "host must be 1..255 bytes"),
        (Peer(MID, "h" * 256, 1, ""), 1, "host must be 1..255 bytes"),
        (Peer(MID, "é" * 128, 1, ""), 1, "got 256"),
        (Peer(MID, "dest\thost", 1, ""), 1, "host 'dest\\thost' contains non-printable"),
        (Peer(MID, 7, 1, ""), 1, "host must be a str"),  # type: ignore[arg-type]
        (Peer(MID, "h", 0, ""), 1, "port must be 1..65535, got 0"),
        (Peer(MID, "h", 65536, ""), 1, "port must be a u16"),
        (Peer(MID, "h", 1, "n" * 256), 1, "server_name must be 0..255 bytes"),
        (Peer(MID, "h", 1, "name\n"), 1, "server_name 'name\\n' contains non-printable"),
        (UsedIdx(MID, 0, ()), 1, "unknown USED_IDX phase 0"),  # type: ignore[arg-type]
        (UsedIdx(MID, 6, ()), 1, "unknown USED_IDX phase 6"),  # type: ignore[arg-type]
        (UsedIdx(MID, 256, ()), 1, "phase must be a u8"),  # type: ignore[arg-type]
        (UsedIdx(MID, UsedPhase.OBSERVE, ((0, 1), (0, 2))), 1, "repeats a nic_id"),
        (
            UsedIdx(MID, UsedPhase.OBSERVE, tuple((i, 0) for i in range(65))),
            6,
            "65 entries; at most 64",
        ),
        (UsedIdx(MID, UsedPhase.OBSERVE, ((0, 65536),)), 1, "entry 0 used_idx must be a u16"),
        (UsedIdx(MID, UsedPhase.OBSERVE, ((0, 1), (-1, 2))), 1, "entry 1 nic_id must be a u16"),
        (UsedIdx(MID, UsedPhase.OBSERVE, ((0,),)), 1, "must be a (nic_id, used_idx) pair"),  # type: ignore[arg-type]
        (Hold(None), 1, "migration_id must be a uuid.UUID"),  # type: ignore[arg-type]
    ],
)
def test_switchover_messages_refused_by_the_encoder(msg: Message, code: int, text: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_message(msg)
    assert text in str(info.value) and info.value.error_code == code
    # The same message refused on its way through a connection, before any state check.
    orch, _ = hello_pair(Role.ORCHESTRATOR)
    assert not orch.can_send(msg)


def _nf(
    flags: int, multicast: list[bytes], unicast: list[bytes], count: int | None = None
) -> bytes:
    n = len(multicast) if count is None else count
    head = MID.bytes + (0).to_bytes(2, "big") + bytes((flags,)) + n.to_bytes(2, "big")
    return head + b"".join(multicast) + len(unicast).to_bytes(2, "big") + b"".join(unicast)


def _peer(host: bytes, port: int, name: bytes = b"") -> bytes:
    def pstr(raw: bytes) -> bytes:
        return len(raw).to_bytes(2, "big") + raw

    return MID.bytes + pstr(host) + port.to_bytes(2, "big") + pstr(name)


def _used(phase: int, entries: list[tuple[int, int]], count: int | None = None) -> bytes:
    n = len(entries) if count is None else count
    body = MID.bytes + bytes((phase,)) + n.to_bytes(2, "big")
    return body + b"".join(a.to_bytes(2, "big") + b.to_bytes(2, "big") for a, b in entries)


@pytest.mark.parametrize(
    ("t", "body", "code", "text"),
    [
        (MsgType.NIC_FILTER, _nf(8, [], []), 1, "flags has unknown bits 0x08"),
        (MsgType.NIC_FILTER, _nf(0xFF, [], []), 1, "unknown bits 0xf8"),
        (MsgType.NIC_FILTER, _nf(0, [MAC0], []), 1, "multicast MAC 0 (52:54:00:12:34:56) lacks"),
        (MsgType.NIC_FILTER, _nf(0, [], [MCAST]), 1, "unicast MAC 0 (01:00:5e:00:00:fb) has"),
        (MsgType.NIC_FILTER, _nf(0, [], [], count=257), 1, "257 multicast MACs; at most 256"),
        (MsgType.NIC_FILTER, _nf(0, [MCAST], [])[:-2] + b"\x01\x01", 1, "257 unicast MACs"),
        (MsgType.NIC_FILTER, _nf(0, [MCAST], [], count=2), 1, "truncated in multicast MACs"),
        (MsgType.NIC_FILTER, _nf(0, [MCAST], [MAC0])[:-1], 1, "truncated in unicast MACs"),
        (MsgType.NIC_FILTER, _nf(0, [], []) + b"\0", 1, "1 unexpected trailing bytes"),
        (MsgType.NIC_FILTER, _nf(0, [], [])[:-1], 1, "shorter than 23"),
        (MsgType.NIC_FILTER, _nf(0, [MCAST] * 256, [MAC0] * 256) + b"\0", 6, "exceeds 3095"),
        (MsgType.PEER, _peer(b"h", 0), 1, "port must be 1..65535, got 0"),
        (MsgType.PEER, _peer(b"", 1, b"n"), 1, "host must be 1..255 bytes"),
        (MsgType.PEER, _peer(b"h" * 256, 1), 1, "host must be 1..255 bytes of UTF-8, got 256"),
        (MsgType.PEER, _peer(b"\xff", 1), 1, "PEER host is not valid UTF-8"),
        (MsgType.PEER, _peer(b"a\x00b", 1), 1, "contains non-printable"),
        (MsgType.PEER, _peer(b"h", 1, b"\x1b[2J"), 1, "server_name '\\x1b[2J' contains non-print"),
        (MsgType.PEER, _peer(b"h", 1, b"n" * 256), 1, "server_name must be 0..255 bytes"),
        (MsgType.PEER, _peer(b"h", 1)[:-2] + b"\x00\x05", 1, "truncated in server name"),
        (MsgType.PEER, _peer(b"h" * 255, 1, b"n" * 255) + b"\0", 6, "exceeds 532"),
        (MsgType.USED_IDX, _used(0, []), 1, "USED_IDX names unknown phase 0"),
        (MsgType.USED_IDX, _used(6, []), 1, "USED_IDX names unknown phase 6"),
        (MsgType.USED_IDX, _used(2, [(0, 1), (0, 2)]), 1, "USED_IDX repeats a nic_id"),
        (MsgType.USED_IDX, _used(2, [], count=65), 1, "65 entries; at most 64"),
        (MsgType.USED_IDX, _used(2, [(0, 1)], count=2), 1, "truncated in entry 1 nic id"),
        (MsgType.USED_IDX, _used(2, [(0, 1)]) + b"\0", 1, "1 unexpected trailing bytes"),
        (MsgType.USED_IDX, _used(2, [(i, 0) for i in range(64)]) + b"\0", 6, "exceeds 275"),
        (MsgType.HOLD, MID.bytes + b"\0", 6, "HOLD body of 17 bytes exceeds 16"),
        (MsgType.HOLD, MID.bytes[:15], 1, "HOLD body of 15 bytes is shorter than 16"),
    ],
)
def test_switchover_messages_refused_by_the_decoder(
    t: MsgType, body: bytes, code: int, text: str
) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(raw_message(t, body))
    assert text in str(info.value) and info.value.error_code == code
    # An agent judges them the same way (header bounds first, then the body).
    _, agent = capturing_pair(leader=Role.ORCHESTRATOR)
    assert text in expect_remote(agent, raw_message(t, body), ErrorCode(code))


def test_switchover_layouts() -> None:
    # The byte layouts of docs/protocol.md, field by field.
    nf = NicFilter(MID, 0x0102, NicFilterFlag.PROMISCUOUS | NicFilterFlag.ALL_UNICAST, (MCAST,))
    layout = bytes.fromhex("0102 05 0001 01005e0000fb 0000")
    assert encode_message(nf)[HEADER_SIZE:] == MID.bytes + layout
    peer = encode_message(Peer(MID, "dst", 7440, "agent"))[HEADER_SIZE:]
    assert (
        peer == MID.bytes + bytes.fromhex("0003") + b"dst" + bytes.fromhex("1d10 0005") + b"agent"
    )
    used = encode_message(UsedIdx(MID, UsedPhase.FINAL, ((1, 2), (0, 0xFFFF))))[HEADER_SIZE:]
    assert used == MID.bytes + bytes.fromhex("04 0002 0001 0002 0000 ffff")
    assert encode_message(Hold(MID)) == raw_message(0x13, MID.bytes)
    # Plain values are accepted where the enums are declared, and decode to the enums.
    plain = UsedIdx(MID, 2, {0: 5, 1: 6})  # type: ignore[arg-type]
    assert plain.entries == ((0, 5), (1, 6))
    decoded = decode_message(encode_message(plain))
    assert isinstance(decoded, UsedIdx) and decoded.phase is UsedPhase.OBSERVE
    assert decoded == UsedIdx(MID, UsedPhase.OBSERVE, ((0, 5), (1, 6)))
    nf3 = decode_message(encode_message(NicFilter(MID, 0, 3, [MCAST])))  # type: ignore[arg-type]
    assert isinstance(nf3, NicFilter) and nf3.multicast == (MCAST,)
    assert nf3.flags == NicFilterFlag.PROMISCUOUS | NicFilterFlag.ALL_MULTICAST
    assert isinstance(nf3.flags, NicFilterFlag)


def _control_pair(stage: str) -> tuple[Connection, Connection]:
    """An ORCHESTRATOR and its AGENT, with migration MID driven up to ``stage``."""
    orch, agent = hello_pair(Role.ORCHESTRATOR)
    steps = [
        ("prepare", orch, agent, Prepare(MID, "vm1", NICS)),
        ("prepared", agent, orch, Prepared(MID)),
        ("capture_on", orch, agent, CaptureOn(MID)),
        ("capturing", agent, orch, Ack(MID, MsgType.CAPTURE_ON)),
    ]
    for name, src, dst, msg in steps:
        if stage == "hello":
            break
        deliver(src, dst, msg)
        if name == stage:
            break
    return orch, agent


def test_switchover_session_is_accepted() -> None:
    orch, agent = hello_pair(Role.ORCHESTRATOR)
    assert orch.negotiated_features == agent.negotiated_features == SUPPORTED_FEATURES
    assert Feature.SWITCHOVER in SUPPORTED_FEATURES and orch.negotiated_version == (1, 2)
    for mid in (MID, MID2):  # every per-migration rule starts afresh with each PREPARE
        sent: list[Message] = [Prepare(mid, "vm1", NICS)]
        # Before PREPARED has arrived: the rules only look at what the orchestrator sent.
        sent += [NicFilter(mid, 1, NicFilterFlag(0), (MCAST,)), Peer(mid, "dst", 7440, "dst")]
        for msg in sent:
            assert deliver(orch, agent, msg) == msg
        deliver(agent, orch, Prepared(mid))
        for msg in [
            NicFilter(mid, 0, NicFilterFlag.PROMISCUOUS, (), (MAC1,)),
            CaptureOn(mid),
        ]:
            assert deliver(orch, agent, msg) == msg
        deliver(agent, orch, Ack(mid, MsgType.CAPTURE_ON))
        assert orch.our_state is agent.their_state is State.CAPTURING
        for msg in [
            UsedIdx(mid, UsedPhase.BASELINE, ((1, 10), (0, 20))),
            UsedIdx(mid, UsedPhase.OBSERVE, ((0, 25),)),
            UsedIdx(mid, UsedPhase.OBSERVE, ()),
            UsedIdx(mid, UsedPhase.OBSERVE, ((0, 26), (1, 11))),
            UsedIdx(mid, UsedPhase.STOPPED, ()),
            Hold(mid),
            Ack(mid, MsgType.HOLD),
            UsedIdx(mid, UsedPhase.FINAL, ((0, 30), (1, 12))),
            VmStarted(mid, 5),
        ]:
            sender, receiver = (agent, orch) if isinstance(msg, Ack) else (orch, agent)
            assert deliver(sender, receiver, msg) == msg
            assert orch.our_state is agent.their_state is State.CAPTURING  # unchanged
        summaries = (NicSummary(0, 1, bytes(32)), NicSummary(1, 0, bytes(32)))
        deliver(agent, orch, End(mid, summaries))
        deliver(agent, orch, Counts(mid, (("relayed", 3),)))
        # The agent's END is no ABORT: the orchestrator may go on until its own closing message.
        resumed = UsedIdx(mid, UsedPhase.RESUMED, ((0, 31),))
        assert deliver(orch, agent, resumed) == resumed
        deliver(orch, agent, Ack(mid, MsgType.END))
        assert orch.our_state is agent.our_state is State.IDLE
        assert not orch.can_send(UsedIdx(mid, UsedPhase.RESUMED, ()))
    deliver(orch, agent, Bye())
    # Once the migration is closed, nothing more may come for it.
    orch, agent = _control_pair("capturing")
    deliver(orch, agent, Abort(MID))
    deliver(agent, orch, Ack(MID, MsgType.ABORT))
    for msg in SWITCHOVER_MSGS:
        assert not orch.can_send(msg)
    text = expect_remote(agent, encode_message(Hold(MID)), ErrorCode.UNEXPECTED_MESSAGE)
    assert "after closing the migration" in text


_B, _O, _S, _F, _R = (
    UsedPhase.BASELINE,
    UsedPhase.OBSERVE,
    UsedPhase.STOPPED,
    UsedPhase.FINAL,
    UsedPhase.RESUMED,
)
_ALL = ((0, 1), (1, 1))


@pytest.mark.parametrize(
    ("stage", "before", "msg", "code", "text"),
    [
        ("hello", [], NicFilter(MID, 0, NicFilterFlag(0)), 5, "not the current one"),
        ("hello", [], Peer(MID, "h", 1, ""), 5, "not the current one"),
        ("hello", [], UsedIdx(MID, _O, ()), 5, "not the current one"),
        ("hello", [], Hold(MID), 5, "not the current one"),
        ("prepare", [], NicFilter(MID2, 0, NicFilterFlag(0)), 5, "not the current one"),
        ("prepare", [], NicFilter(MID, 7, NicFilterFlag(0)), 5, "nic 7, which was not prepared"),
        (
            "prepared",
            [NicFilter(MID, 0, NicFilterFlag(0))],
            NicFilter(MID, 0, NicFilterFlag(1)),
            5,
            "NIC_FILTER for nic 0 twice",
        ),
        ("prepared", [Peer(MID, "h", 1, "")], Peer(MID, "h", 2, ""), 5, "sent PEER twice"),
        ("capture_on", [], NicFilter(MID, 0, NicFilterFlag(0)), 5, "NIC_FILTER after CAPTURE_ON"),
        ("capture_on", [], Peer(MID, "h", 1, ""), 5, "PEER after CAPTURE_ON"),
        ("capturing", [], Peer(MID, "h", 1, ""), 5, "PEER after CAPTURE_ON"),
        ("prepare", [], UsedIdx(MID, _B, _ALL), 5, "USED_IDX before CAPTURE_ON was ACKed"),
        ("capture_on", [], UsedIdx(MID, _O, ()), 5, "USED_IDX before CAPTURE_ON was ACKed"),
        ("prepared", [], Hold(MID), 5, "HOLD before CAPTURE_ON was ACKed"),
        ("capture_on", [], Hold(MID), 5, "HOLD before CAPTURE_ON was ACKed"),
        ("capturing", [Hold(MID)], Hold(MID), 5, "sent HOLD twice"),
        ("capturing", [], UsedIdx(MID, _O, ((9, 1),)), 5, "nic 9, which was not prepared"),
        ("capturing", [], UsedIdx(MID, _B, ((0, 1),)), 1, "USED_IDX(BASELINE) lists nics [0]"),
        ("capturing", [], UsedIdx(MID, _F, ((1, 1),)), 1, "must list every prepared NIC"),
        ("capturing", [], UsedIdx(MID, _F, ()), 1, "must list every prepared NIC [0, 1]"),
        ("capturing", [UsedIdx(MID, _B, _ALL)], UsedIdx(MID, _B, _ALL), 5, "(BASELINE) twice"),
        ("capturing", [UsedIdx(MID, _S, ())], UsedIdx(MID, _S, ()), 5, "(STOPPED) twice"),
        ("capturing", [UsedIdx(MID, _F, _ALL)], UsedIdx(MID, _F, _ALL), 5, "(FINAL) twice"),
        ("capturing", [UsedIdx(MID, _R, ())], UsedIdx(MID, _R, ()), 5, "(RESUMED) twice"),
        (
            "capturing",
            [UsedIdx(MID, _S, ())],
            UsedIdx(MID, _O, ()),
            5,
            "USED_IDX(OBSERVE) after USED_IDX(STOPPED): phases only move forward",
        ),
        ("capturing", [UsedIdx(MID, _O, ())], UsedIdx(MID, _B, _ALL), 5, "only move forward"),
        ("capturing", [UsedIdx(MID, _R, ())], UsedIdx(MID, _F, _ALL), 5, "only move forward"),
        ("capturing", [Abort(MID)], UsedIdx(MID, _O, ()), 5, "after closing the migration"),
        ("capturing", [Abort(MID)], Hold(MID), 5, "after closing the migration"),
        ("capturing", [UsedIdx(MID, _O, ())], UsedIdx(MID2, _O, ()), 5, "not the current one"),
    ],
)
def test_switchover_state_rules(
    stage: str, before: list[Message], msg: Message, code: int, text: str
) -> None:
    # Each rule is one the receiver can check too: it only looks at what the orchestrator sent
    # or at what the agent itself sent (ACK(CAPTURE_ON)). So both ends refuse the same message.
    orch, agent = _control_pair(stage)
    for m in before:
        deliver(orch, agent, m)
    data = encode_message(msg)
    assert not orch.can_send(msg)
    with pytest.raises(LocalProtocolError) as info:
        orch.send(msg)
    assert text in str(info.value) and info.value.error_code == code
    assert orch.our_state is State.ERROR
    assert text in expect_remote(agent, data, ErrorCode(code))


@pytest.mark.parametrize("msg", SWITCHOVER_MSGS, ids=lambda m: type(m).__name__)
def test_only_the_orchestrator_sends_switchover_messages(msg: Message) -> None:
    name = msg.TYPE.name
    # The agent may only receive them.
    orch, agent = _control_pair("capturing")
    with pytest.raises(LocalProtocolError, match=f"AGENT may not send {name}"):
        agent.send(msg)
    expect_remote(orch, encode_message(msg), ErrorCode.UNEXPECTED_MESSAGE)
    # Not on the frame channel either, in either direction, although SWITCHOVER is negotiated.
    for i in range(2):
        src, dst = capturing_pair()
        assert src.negotiated_features == SUPPORTED_FEATURES
        sender, receiver = (src, dst) if i == 0 else (dst, src)
        role = sender.our_role.name
        with pytest.raises(LocalProtocolError, match=f"{role} may not send {name}"):
            sender.send(msg)
        text = expect_remote(receiver, encode_message(msg), ErrorCode.UNEXPECTED_MESSAGE)
        assert f"{role} may not send {name}" in text


def test_switchover_messages_that_cross_an_abort() -> None:
    # The agent refuses the PREPARE while NIC_FILTER and PEER are on their way: they crossed
    # its ABORT, so it accepts them and the application ignores them.
    orch, agent = _control_pair("prepare")
    in_flight = orch.send(NicFilter(MID, 0, NicFilterFlag(0))) + orch.send(Peer(MID, "h", 1, ""))
    orch.receive_data(agent.send(Abort(MID, "tap not found")))
    assert drain(orch) == [Abort(MID, "tap not found")]
    agent.receive_data(in_flight)
    assert [type(e) for e in drain(agent)] == [NicFilter, Peer]
    # Having received the ABORT, the orchestrator may only acknowledge it: a rule only its
    # own end can check.
    for msg in [NicFilter(MID, 1, NicFilterFlag(0)), CaptureOn(MID)]:
        with pytest.raises(LocalProtocolError, match="only ACK"):
            _control_pair_after_abort("prepare").send(msg)
    # The same during capture: a USED_IDX and a HOLD that cross the agent's ABORT.
    orch, agent = _control_pair("capturing")
    in_flight = orch.send(UsedIdx(MID, UsedPhase.STOPPED, ())) + orch.send(Hold(MID))
    orch.receive_data(agent.send(Abort(MID, "agent shutting down")))
    drain(orch)
    assert not orch.can_send(UsedIdx(MID, UsedPhase.FINAL, _ALL))
    assert not orch.can_send(Hold(MID))
    agent.receive_data(in_flight)
    assert [type(e) for e in drain(agent)] == [UsedIdx, Hold]
    deliver(orch, agent, Ack(MID, MsgType.ABORT))
    assert orch.our_state is agent.our_state is State.IDLE


def _control_pair_after_abort(stage: str) -> Connection:
    orch, agent = _control_pair(stage)
    deliver(agent, orch, Abort(MID))
    return orch


# --- protocol 1.1 against 1.0 peers -----------------------------------------------------------

V1_0_FEATURES = Feature.VNET_HDR | Feature.COUNTS  # all that 1.0 defines


def _with_1_0_agent(agent_hello: Hello) -> tuple[Connection, Connection]:
    """A 1.1 orchestrator that receives ``agent_hello``, and an agent that stands for that
    peer: a Connection announcing the features 1.0 defines, in the same version."""
    orch, agent = Connection(Role.ORCHESTRATOR), Connection(Role.AGENT)
    deliver(orch, agent, orch.make_hello("orch"))
    agent.send(Hello(Role.AGENT, "agent", V1_0_FEATURES, agent_hello.version))
    orch.receive_data(encode_message(agent_hello))
    assert drain(orch) == [agent_hello]
    return orch, agent


@pytest.mark.parametrize(
    "agent_hello",
    [
        Hello(Role.AGENT, "agent-1.0", V1_0_FEATURES, (1, 0)),
        # A 1.0 peer may set bit 2 for all we know: to 1.0 it is an unknown bit, and ignored.
        Hello(Role.AGENT, "agent-1.0", Feature(0xFFFFFFFF), (1, 0)),
        # A 1.1 peer that does not implement the switchover.
        Hello(Role.AGENT, "agent-1.1", V1_0_FEATURES, (1, 1)),
    ],
    ids=["1.0", "1.0-all-bits", "1.1-without-switchover"],
)
def test_switchover_messages_need_the_feature(agent_hello: Hello) -> None:
    orch, agent = _with_1_0_agent(agent_hello)
    minor = agent_hello.version[1]
    assert orch.negotiated_version == agent.negotiated_version == (1, minor)
    assert orch.negotiated_features == agent.negotiated_features == V1_0_FEATURES
    # Everything 1.0 has still works, COUNTS included.
    deliver(orch, agent, Prepare(MID, "vm1", NICS))
    deliver(agent, orch, Prepared(MID))
    deliver(orch, agent, CaptureOn(MID))
    deliver(agent, orch, Ack(MID, MsgType.CAPTURE_ON))
    deliver(agent, orch, VmStarted(MID, 1))
    deliver(orch, agent, VmStarted(MID, 2))
    deliver(agent, orch, Counts(MID, (("captured", 2),)))
    # No 1.1 message may go to such a peer, at any point of the migration ...
    for msg in SWITCHOVER_MSGS:
        assert not orch.can_send(msg)
        with pytest.raises(LocalProtocolError, match="needs the SWITCHOVER feature") as info:
            _with_1_0_agent(agent_hello)[0].send(msg)
        assert info.value.error_code == ErrorCode.FEATURE_NOT_NEGOTIATED
    # ... and one that arrives anyway is refused from its header.
    for msg in SWITCHOVER_MSGS:
        _, peer = _with_1_0_agent(agent_hello)
        header = encode_message(msg)[:HEADER_SIZE]
        text = expect_remote(peer, header, ErrorCode.FEATURE_NOT_NEGOTIATED)
        assert f"{msg.TYPE.name} needs the SWITCHOVER feature" in text
    summaries = (NicSummary(0, 0, bytes(32)), NicSummary(1, 0, bytes(32)))
    deliver(agent, orch, End(MID, summaries))
    deliver(orch, agent, Ack(MID, MsgType.END))
    deliver(orch, agent, Bye())


def _hold_sent(agent_minor: int) -> tuple[Connection, Connection]:
    """An orchestrator and an agent of version 1.AGENT_MINOR, capture on and HOLD sent."""
    orch, agent = Connection(Role.ORCHESTRATOR), Connection(Role.AGENT)
    deliver(orch, agent, orch.make_hello("orch"))
    features = SUPPORTED_FEATURES if agent_minor >= 2 else SUPPORTED_FEATURES & ~Feature.HOLD_ACK
    deliver(agent, orch, Hello(Role.AGENT, "agent", features, (1, agent_minor)))
    deliver(orch, agent, Prepare(MID, "vm1", NICS))
    deliver(agent, orch, Prepared(MID))
    deliver(orch, agent, CaptureOn(MID))
    deliver(agent, orch, Ack(MID, MsgType.CAPTURE_ON))
    return orch, agent


def test_hold_ack_needs_protocol_1_2() -> None:
    orch, agent = _hold_sent(1)
    assert orch.negotiated_version == (1, 1) and Feature.HOLD_ACK not in orch.negotiated_features
    # ACK(HOLD) before HOLD is refused even where the feature is on.
    with pytest.raises(LocalProtocolError, match="acknowledged HOLD, which was never sent"):
        _hold_sent(2)[1].send(Ack(MID, MsgType.HOLD))
    o2, a2 = _hold_sent(2)
    deliver(o2, a2, Hold(MID))
    deliver(a2, o2, Ack(MID, MsgType.HOLD))
    with pytest.raises(LocalProtocolError, match="twice"):
        a2.send(Ack(MID, MsgType.HOLD))
    # A 1.1 agent has no ACK(HOLD); one that sends it anyway is refused.
    deliver(orch, agent, Hold(MID))
    with pytest.raises(LocalProtocolError, match="needs the HOLD_ACK feature") as info:
        agent.send(Ack(MID, MsgType.HOLD))
    assert info.value.error_code == ErrorCode.FEATURE_NOT_NEGOTIATED
    o3, a3 = _hold_sent(1)
    deliver(o3, a3, Hold(MID))
    ack = encode_message(Ack(MID, MsgType.HOLD))
    text = expect_remote(o3, ack, ErrorCode.FEATURE_NOT_NEGOTIATED)
    assert "HOLD_ACK" in text


def test_a_1_0_orchestrator_and_a_1_1_agent() -> None:
    orch, agent = Connection(Role.ORCHESTRATOR), Connection(Role.AGENT)
    deliver(orch, agent, Hello(Role.ORCHESTRATOR, "orch-1.0", V1_0_FEATURES, (1, 0)))
    deliver(agent, orch, agent.make_hello("agent"))
    assert agent.negotiated_version == (1, 0) and agent.negotiated_features == V1_0_FEATURES
    deliver(orch, agent, Prepare(MID, "vm1", NICS))
    with pytest.raises(LocalProtocolError, match="SWITCHOVER"):
        orch.send(Peer(MID, "h", 1, ""))
    expect_remote(agent, encode_message(Peer(MID, "h", 1, "")), ErrorCode.FEATURE_NOT_NEGOTIATED)


def test_a_1_0_hello_cannot_announce_switchover() -> None:
    conn = Connection(Role.ORCHESTRATOR)
    hello = Hello(Role.ORCHESTRATOR, "orch", SUPPORTED_FEATURES, (1, 0))
    with pytest.raises(LocalProtocolError, match=r"a version 1\.0 HELLO cannot announce"):
        conn.send(hello)
    conn = Connection(Role.ORCHESTRATOR)
    conn.send(Hello(Role.ORCHESTRATOR, "orch", V1_0_FEATURES, (1, 0)))  # a 1.0 HELLO is fine


# --- frame records, digests, clocks ---------------------------------------------------------


def test_frame_record_layout_matches_filter_mirror() -> None:
    r = FrameRecord(VNET + eth(b"hi"), 12)
    data = encode_frame_record(r)
    assert data[:8] == (28).to_bytes(4, "big") + (12).to_bytes(4, "big")
    assert data[8:] == r.data and r.vnet_hdr == VNET and r.payload == eth(b"hi")
    with pytest.raises(LocalProtocolError):
        encode_frame_record(FrameRecord(b"ab", 3))


def test_decode_frame_records_streaming() -> None:
    stream = b"".join(encode_frame_record(rec(bytes([i]) * i)) for i in range(1, 6))
    out, used = decode_frame_records(stream)
    assert [r.payload for r in out] == [eth(bytes([i]) * i) for i in range(1, 6)]
    assert used == len(stream)
    # A chardev read that stops mid-record: complete records now, the rest later.
    part, used = decode_frame_records(stream[:50], partial=True)
    assert used == sum(8 + len(r.data) for r in part) and len(part) == 2
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decode_frame_records(stream[:50])
    with pytest.raises(RemoteProtocolError, match="max_frame_bytes"):
        decode_frame_records((70000).to_bytes(4, "big") + bytes(4), partial=True)
    out, used = decode_frame_records(stream, max_records=2, start=0)
    assert len(out) == 2 and used < len(stream)


def test_frame_digest_is_sha256_over_the_records() -> None:
    frames = [rec(b"a"), rec(b"b", vnet=True)]
    d = FrameDigest()
    assert d.digest() == hashlib.sha256().digest()
    d.update_many(frames)
    expected = hashlib.sha256(b"".join(encode_frame_record(r) for r in frames))
    assert d.digest() == expected.digest() and d.hexdigest() == expected.hexdigest()
    assert d.summary(3) == NicSummary(3, 2, expected.digest())
    raw = FrameDigest()
    raw.update_encoded(b"".join(encode_frame_record(r) for r in frames), len(frames))
    assert raw.summary(3) == d.summary(3)


class _Bytes(bytes):
    pass


class _Record(FrameRecord):
    __slots__ = ()


def test_frames_batch_paths_agree_with_the_per_record_rules() -> None:
    # FRAMES are checked a whole batch at a time; unusual but valid records take the
    # per-record path, and a bad record is still named by its position.
    ba = FrameRecord(bytearray(eth(b"b")))  # type: ignore[arg-type]
    odd = (rec(b"a"), ba, FrameRecord(_Bytes(eth(b"c"))), _Record(eth(b"d")))
    data = encode_message(Frames(MID, 0, 0, odd))
    assert data[HEADER_SIZE + 30 :] == b"".join(encode_frame_record(r) for r in odd)
    assert decode_message(data) == Frames(MID, 0, 0, tuple(FrameRecord(r.data) for r in odd))
    for bad, text in [
        (FrameRecord(eth(b"x"), True), "frame 2 vnet_hdr_len must be a u32"),
        (FrameRecord("text"), "frame 2 data must be bytes"),  # type: ignore[arg-type]
        (b"raw", "frame 2 must be a FrameRecord"),
        (FrameRecord(bytes(13)), "frame 2: 13-byte frame is shorter than 14"),
    ]:
        with pytest.raises(LocalProtocolError, match=text):
            encode_message(Frames(MID, 0, 0, (rec(), rec(), bad, rec())))  # type: ignore[arg-type]
    # A receiver names the first bad record the same way, wherever the batch goes wrong.
    body = bytearray(data[HEADER_SIZE:])
    body[30 + 8 + 15 : 30 + 8 + 15 + 4] = (5).to_bytes(4, "big")  # record 1: length 5
    with pytest.raises(RemoteProtocolError, match="frame record 1: 5-byte frame is shorter"):
        decode_message(raw_message(MsgType.FRAMES, bytes(body)))
    with pytest.raises(RemoteProtocolError, match="frame record 3 truncated"):
        decode_message(raw_message(MsgType.FRAMES, data[HEADER_SIZE:-1]))
    with pytest.raises(RemoteProtocolError, match="1 unexpected trailing bytes"):
        decode_message(raw_message(MsgType.FRAMES, data[HEADER_SIZE:] + b"\0"))


def test_clock_offset() -> None:
    # Peer clock 1000 ns ahead, 40 ns each way, 10 ns turnaround.
    s = clock_offset(0, 1040, 1050, 90)
    assert (s.offset_ns, s.delay_ns, s.uncertainty_ns) == (1000, 80, 40)
    with pytest.raises(ValueError, match="backwards"):
        clock_offset(10, 0, 0, 5)
    with pytest.raises(ValueError, match="turnaround"):
        clock_offset(0, 0, 100, 50)


@FUZZ
@given(
    st.integers(0, 2**50),
    st.integers(-(10**12), 10**12),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**6),
)
def test_clock_offset_bounds_the_true_offset(
    t1: int, true_offset: int, out_ns: int, back_ns: int, turn_ns: int
) -> None:
    t2 = t1 + out_ns + true_offset
    t3 = t2 + turn_ns
    t4 = t3 - true_offset + back_ns
    s = clock_offset(t1, t2, t3, t4)
    assert s.delay_ns == out_ns + back_ns
    assert abs(s.offset_ns - true_offset) <= s.uncertainty_ns


# --- the documented examples ----------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def doc_hex_blocks() -> list[bytes]:
    blocks = re.findall(r"```hex\n(.*?)```", DOC.read_text(), flags=re.S)
    return [bytes.fromhex(re.sub(r"#[^\n]*", "", block)) for block in blocks]


def test_docs_examples_decode_to_the_documented_events() -> None:
    hello, frames = doc_hex_blocks()
    vnet = bytes(10) + b"\x01\x00"
    f1 = FrameRecord(vnet + bytes.fromhex("ffffffffffff 525400123456 88b5") + b"hi", 12)
    f2 = FrameRecord(vnet + bytes.fromhex("525400123456 525400654321 88b5") + b"yo!", 12)
    expected_hello = Hello(
        role=Role.SOURCE_AGENT,
        identity="src-host",
        features=Feature.VNET_HDR | Feature.COUNTS | Feature.SWITCHOVER | Feature.HOLD_ACK,
        version=(1, 2),
        max_message_bytes=16 * 1024 * 1024,
        max_frames_per_batch=4096,
        max_frame_bytes=65535,
        max_vnet_hdr_bytes=32,
    )
    assert Connection(Role.SOURCE_AGENT).make_hello("src-host") == expected_hello
    expected_frames = Frames(MID, 0, 0, (f1, f2))
    assert decode_message(hello) == expected_hello
    assert decode_message(frames) == expected_frames
    assert encode_message(expected_hello) == hello and encode_message(expected_frames) == frames
    assert (len(hello), len(frames)) == (43, 115)
    # The digest quoted in the document.
    d = FrameDigest()
    d.update_many([f1, f2])
    assert d.hexdigest() in DOC.read_text()
    assert hashlib.sha256(frames[HEADER_SIZE + 30 :]).hexdigest() == d.hexdigest()
    # And a real destination accepts them in that order.
    dst = Connection(Role.DEST_AGENT)
    dst.send(dst.make_hello("dst"))
    dst.receive_data(hello)
    assert drain(dst) == [expected_hello]
    dst.receive_data(encode_message(Prepare(MID, "vm1", (NicSpec(0, "tap0", MAC0),))))
    drain(dst)
    dst.send(Prepared(MID))
    dst.receive_data(encode_message(CaptureOn(MID)))
    drain(dst)
    dst.send(Ack(MID, MsgType.CAPTURE_ON))
    dst.receive_data(frames)
    assert drain(dst) == [expected_frames]


def test_docs_list_every_message_and_error_code() -> None:
    text = DOC.read_text()
    for t in MsgType:
        assert f"0x{t.value:02X} | `{t.name}`" in text, t
    for code in ErrorCode:
        assert f"`{code.name}`" in text or code is ErrorCode.APPLICATION, code


# --- fuzzing --------------------------------------------------------------------------------

ROLES = list(Role)


def _replay(role: Role, scenario: str, data: bytes, chunks: list[int], limits: Limits) -> None:
    # replay() raises anything but RemoteProtocolError, and asserts the buffer limit.
    fuzz_wire.replay(role, scenario, data, chunks or [len(data) + 1], limits)


@FUZZ
@given(
    st.sampled_from(ROLES),
    st.binary(max_size=512),
    st.lists(st.integers(1, 64), max_size=20),
    st.booleans(),
)
def test_fuzz_random_bytes(role: Role, data: bytes, chunks: list[int], tight: bool) -> None:
    _replay(role, "complete", data, chunks, fuzz_wire.TIGHT_LIMITS if tight else DEFAULT_LIMITS)


@FUZZ
@given(st.data())
def test_fuzz_mutated_sessions(data: st.DataObject) -> None:
    role, scenario, stream = data.draw(st.sampled_from(TRANSCRIPTS))
    buf = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "seeded"]))
        at = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if kind == "flip" and buf:
            buf[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[at] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del buf[at : at + data.draw(st.integers(1, 32))]
        elif kind == "cut":
            del buf[at:]
        elif kind == "seeded":
            rng = random.Random(data.draw(st.integers(0, 2**32)))
            buf[:] = fuzz_wire.mutate(bytes(buf), rng, [t[2] for t in TRANSCRIPTS])
    chunks = data.draw(st.lists(st.integers(1, 200), max_size=30))
    tight = data.draw(st.booleans())
    _replay(role, scenario, bytes(buf), chunks, fuzz_wire.TIGHT_LIMITS if tight else DEFAULT_LIMITS)


@FUZZ
@given(st.sampled_from(TRANSCRIPTS), st.lists(st.integers(1, 300), min_size=1, max_size=40))
def test_fuzz_split_points_do_not_change_events(
    transcript: tuple[Role, str, bytes], chunks: list[int]
) -> None:
    role, scenario, stream = transcript
    whole = fuzz_wire.Responder(Connection(role), scenario)
    whole.start()
    whole.feed(stream)
    whole.feed(b"")
    split = fuzz_wire.Responder(Connection(role), scenario)
    split.start()
    pos = 0
    for size in chunks:
        split.feed(stream[pos : pos + size])
        pos += size
    split.feed(stream[pos:])
    split.feed(b"")
    assert split.events == whole.events


@FUZZ
@given(st.integers(0, 200_000), st.lists(st.integers(1, 70_000), min_size=1, max_size=8))
def test_fuzz_buffer_never_exceeds_limit(announced: int, chunks: list[int]) -> None:
    # A header that announces a body of any size, then bulk data in arbitrary reads.
    tight = fuzz_wire.TIGHT_LIMITS
    _, dst = capturing_pair(peer_limits=tight)
    stream = raw_message(MsgType.FRAMES, b"")[:8] + announced.to_bytes(4, "big")
    stream += bytes(sum(chunks))
    pos = 0
    try:
        for size in [HEADER_SIZE, *chunks]:
            dst.receive_data(stream[pos : pos + size])
            pos += size
            assert dst.buffered_bytes <= tight.max_buffer_bytes
            drain(dst)
    except RemoteProtocolError:
        assert dst.buffered_bytes <= tight.max_buffer_bytes


def test_run_fuzz_smoke() -> None:
    stats = fuzz_wire.run_fuzz(300, seed=1)
    assert stats["unexpected"] == 0, stats["first_unexpected"]
    assert stats["cases"] == 300 and stats["remote_errors"] > 0 and stats["events"] > 0
    assert stats["unmutated_cases"] > 0 and stats["clean_closes"] >= stats["unmutated_cases"]
