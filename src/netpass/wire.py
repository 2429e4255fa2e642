"""Sans-I/O wire protocol spoken between netpass processes.

Modelled on h11: :class:`Connection` is a pure state machine. The caller owns the socket (and
the mutual TLS around it), feeds what it reads to :meth:`Connection.receive_data`, pulls
events from :meth:`Connection.next_event` and writes whatever :meth:`Connection.send`
returns. Nothing here blocks, reads a clock or touches the network, so the same code serves
asyncio, threads and the fuzzer.

Two channels share one message set and one state machine:

* control: ORCHESTRATOR (leads) <-> AGENT (follows), one connection per host; since version
  1.1 (feature SWITCHOVER) the orchestrator also tells the agents what QMP said (NIC_FILTER,
  PEER, USED_IDX, HOLD); since 1.2 (feature HOLD_ACK) the agent acknowledges HOLD once the
  hold is closed;
* frames:  SOURCE_AGENT (leads) <-> DEST_AGENT (follows), carrying the captured frames.

docs/protocol.md is the normative description; tests decode its hex examples.
"""

from __future__ import annotations

import enum
import hashlib
import operator
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import ClassVar, Final, NoReturn
from uuid import UUID

from netpass.errors import NetpassError

__all__ = [
    "DEFAULT_LIMITS",
    "ETH_HLEN",
    "HEADER_SIZE",
    "MAGIC",
    "NEED_DATA",
    "PAUSED",
    "PROTOCOL_VERSION",
    "SUPPORTED_FEATURES",
    "Abort",
    "Ack",
    "Bye",
    "CaptureOn",
    "ClockSample",
    "Connection",
    "ConnectionClosed",
    "Counts",
    "End",
    "Error",
    "ErrorCode",
    "Event",
    "Feature",
    "FrameDigest",
    "FrameRecord",
    "Frames",
    "GiveBack",
    "Hello",
    "Hold",
    "Limits",
    "LocalProtocolError",
    "Message",
    "MsgType",
    "NicFilter",
    "NicFilterFlag",
    "NicSpec",
    "NicSummary",
    "Peer",
    "Ping",
    "Pong",
    "Prepare",
    "Prepared",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
    "Sentinel",
    "State",
    "UsedIdx",
    "UsedPhase",
    "VmStarted",
    "clock_offset",
    "decode_frame_records",
    "decode_message",
    "encode_frame_record",
    "encode_message",
]

PROTOCOL_VERSION: Final[tuple[int, int]] = (1, 2)
MAGIC: Final = b"NPAS"
_HEADER: Final = struct.Struct(">4sBBHI")  # magic, major version, type, flags, body length
HEADER_SIZE: Final = _HEADER.size
_RECORD: Final = struct.Struct(">II")  # filter-mirror record: total length, vnet header length
# A whole FRAMES prefix in one pack: header, then migration id, nic id, first index, frame count.
_FRAMES_PREFIX: Final = struct.Struct(">4sBBHI16sHQI")
_U8: Final = struct.Struct(">B")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")

ETH_HLEN: Final = 14  # a tap rejects anything shorter than an Ethernet header
DIGEST_SIZE: Final = 32  # SHA-256
MAX_NICS: Final = 64
MAX_COUNTERS: Final = 256
MAX_IDENTITY_BYTES: Final = 255
MAX_VM_NAME_BYTES: Final = 255
MAX_TAP_BYTES: Final = 15  # IFNAMSIZ - 1
MAX_COUNTER_NAME_BYTES: Final = 64
MAX_TEXT_BYTES: Final = 1024  # ABORT/GIVE_BACK reasons and ERROR messages
MAX_PENDING_PINGS: Final = 16
MAX_FILTER_MACS: Final = 256  # each NIC_FILTER MAC list
MAX_HOST_BYTES: Final = 255  # PEER host
MAX_SERVER_NAME_BYTES: Final = 255  # PEER server_name
MAX_USED_ENTRIES: Final = MAX_NICS  # USED_IDX entries
MIN_MESSAGE_LIMIT: Final = 32 * 1024  # every control message fits; see _BODY_BOUNDS
_FRAMES_FIXED: Final = 30  # migration id, nic id, first index, frame count
_COUNTER_NAME_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
)
assert _FRAMES_PREFIX.size == HEADER_SIZE + _FRAMES_FIXED


# --- errors ---------------------------------------------------------------------------------


class ErrorCode(enum.IntEnum):
    """Codes carried by ERROR (u16). Codes from 0x8000 up belong to the application."""

    MALFORMED = 1  # bad magic, bad field value, truncated or inconsistent body
    UNKNOWN_MESSAGE = 2  # a message type this version does not define
    UNSUPPORTED_VERSION = 3  # different major protocol version
    BAD_ROLE = 4  # HELLO from a role that does not pair with ours
    UNEXPECTED_MESSAGE = 5  # well formed, but not allowed in the sender's state
    LIMIT_EXCEEDED = 6  # a Limits value or a protocol maximum was exceeded
    FEATURE_NOT_NEGOTIATED = 7  # the message needs a feature one side lacks
    INTEGRITY = 8  # frame indices or END totals disagree with the frames sent
    INTERNAL = 9  # the sender failed for a reason of its own
    APPLICATION = 0x8000  # first application-defined code


class ProtocolError(NetpassError):
    """A protocol rule was broken; ``error_code`` is what to put in an ERROR message."""

    def __init__(self, message: str, error_code: int = ErrorCode.MALFORMED) -> None:
        super().__init__(message)
        self.error_code = error_code


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids in our current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversize or out of order."""


class _Invalid(Exception):
    # Raised by the shared validators; the caller turns it into Local- or RemoteProtocolError
    # depending on which side produced the data.
    def __init__(self, message: str, code: ErrorCode = ErrorCode.MALFORMED) -> None:
        super().__init__(message)
        self.code = code


_UNEXP: Final = ErrorCode.UNEXPECTED_MESSAGE


def _need(cond: bool, message: str, code: ErrorCode = ErrorCode.MALFORMED) -> None:
    if not cond:
        raise _Invalid(message, code)


def _uint(name: str, value: object, bits: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << bits
    _need(ok, f"{name} must be a u{bits}, got {value!r}")


# --- enumerations ---------------------------------------------------------------------------


class Role(enum.IntEnum):
    """Who a process is on a connection. Each role pairs with exactly one peer role."""

    ORCHESTRATOR = 1
    AGENT = 2
    SOURCE_AGENT = 3
    DEST_AGENT = 4

    @property
    def peer(self) -> Role:
        return _PEER_ROLE[self]

    @property
    def leads(self) -> bool:
        """Leaders open migrations (PREPARE, CAPTURE_ON); followers answer."""
        return self in _LEADERS


_PEER_ROLE: Final = {
    Role.ORCHESTRATOR: Role.AGENT,
    Role.AGENT: Role.ORCHESTRATOR,
    Role.SOURCE_AGENT: Role.DEST_AGENT,
    Role.DEST_AGENT: Role.SOURCE_AGENT,
}
_LEADERS: Final = frozenset({Role.ORCHESTRATOR, Role.SOURCE_AGENT})
_FOLLOWERS: Final = frozenset({Role.AGENT, Role.DEST_AGENT})
_ALL_ROLES: Final = frozenset(Role)


class Feature(enum.IntFlag):
    """Optional capabilities, announced in HELLO; a feature is on only if both sides announce it."""

    NONE = 0
    VNET_HDR = 1 << 0  # frame records may carry a virtio-net header
    COUNTS = 1 << 1  # COUNTS messages may be sent
    SWITCHOVER = 1 << 2  # NIC_FILTER, PEER, USED_IDX and HOLD may be sent (version 1.1)
    HOLD_ACK = 1 << 3  # the agent answers HOLD with ACK(HOLD) once the hold is closed (1.2)


SUPPORTED_FEATURES: Final = (
    Feature.VNET_HDR | Feature.COUNTS | Feature.SWITCHOVER | Feature.HOLD_ACK
)
# The minor version that defined each feature: to a side of an older minor version the bit is
# unknown, so it cannot announce it and a peer's announcement of it does not count.
_FEATURE_SINCE: Final[Mapping[Feature, int]] = {
    Feature.VNET_HDR: 0,
    Feature.COUNTS: 0,
    Feature.SWITCHOVER: 1,
    Feature.HOLD_ACK: 2,
}


def _features_of(minor: int) -> Feature:
    """The features a side speaking version 1.``minor`` can implement."""
    out = Feature.NONE
    for feature, since in _FEATURE_SINCE.items():
        if since <= minor:
            out |= feature
    return out


class MsgType(enum.IntEnum):
    HELLO = 0x01
    PREPARE = 0x02
    PREPARED = 0x03
    CAPTURE_ON = 0x04
    ACK = 0x05
    VM_STARTED = 0x06
    FRAMES = 0x07
    END = 0x08
    ABORT = 0x09
    GIVE_BACK = 0x0A
    COUNTS = 0x0B
    PING = 0x0C
    PONG = 0x0D
    ERROR = 0x0E
    BYE = 0x0F
    # Version 1.1, control channel, need SWITCHOVER.
    NIC_FILTER = 0x10
    PEER = 0x11
    USED_IDX = 0x12
    HOLD = 0x13


class NicFilterFlag(enum.IntFlag):
    """NIC_FILTER flags: the guest's receive filter modes (QEMU query-rx-filter)."""

    PROMISCUOUS = 1
    ALL_MULTICAST = 2
    ALL_UNICAST = 4


_NIC_FILTER_FLAGS: Final = int(
    NicFilterFlag.PROMISCUOUS | NicFilterFlag.ALL_MULTICAST | NicFilterFlag.ALL_UNICAST
)


class UsedPhase(enum.IntEnum):
    """What a USED_IDX reading is: phases only move forward within a migration."""

    BASELINE = 1  # read with nothing in flight: start relaying
    OBSERVE = 2  # a periodic reading, so the u16 counter can be unwrapped
    STOPPED = 3  # QEMU stopped the VM: stop relaying now
    FINAL = 4  # the used-idx at the stop: account, drain, stream the owed frames
    RESUMED = 5  # the migration failed and the source VM runs again: give the frames back


class State(enum.Enum):
    """One side's state, as far as this end can know it (see docs/protocol.md)."""

    START = "START"  # HELLO not sent yet
    IDLE = "IDLE"  # no migration open on this side
    PREPARING = "PREPARING"  # leader: PREPARE sent
    PREPARED = "PREPARED"  # follower: PREPARED sent
    CAPTURING = "CAPTURING"  # leader: CAPTURE_ON sent; follower: it acknowledged CAPTURE_ON
    CLOSING = "CLOSING"  # sent END/ABORT/GIVE_BACK or an ACK of one; waiting for the other's
    CLOSED = "CLOSED"  # sent BYE or ERROR, or (peer) closed the connection
    ERROR = "ERROR"  # broke the protocol; the connection is unusable


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    PAUSED = "PAUSED"  # the peer has finished; no further event will ever come


NEED_DATA: Final = Sentinel.NEED_DATA
PAUSED: Final = Sentinel.PAUSED


# --- limits ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard bounds on what a Connection accepts; the first four are announced in HELLO."""

    max_message_bytes: int = 16 * 1024 * 1024  # header + body
    max_frames_per_batch: int = 4096
    max_frame_bytes: int = 65535  # frame bytes after the vnet header
    max_vnet_hdr_bytes: int = 32  # virtio_net_hdr_v1_hash is 20
    max_buffer_bytes: int = 32 * 1024 * 1024  # received but not yet consumed

    def __post_init__(self) -> None:
        try:
            _check_limits(
                self.max_message_bytes,
                self.max_frames_per_batch,
                self.max_frame_bytes,
                self.max_vnet_hdr_bytes,
            )
        except _Invalid as exc:
            raise ValueError(str(exc)) from None
        if not isinstance(self.max_buffer_bytes, int) or (
            self.max_buffer_bytes < self.max_message_bytes
        ):
            raise ValueError("max_buffer_bytes must be at least max_message_bytes")


def _check_limits(message: int, batch: int, frame: int, vnet: int) -> None:
    # Shared by Limits and by HELLO validation, so a peer cannot announce limits we could
    # not represent.
    _uint("max_frames_per_batch", batch, 32)
    _uint("max_frame_bytes", frame, 32)
    _uint("max_vnet_hdr_bytes", vnet, 16)
    _uint("max_message_bytes", message, 32)
    _need(batch >= 1, "max_frames_per_batch must be at least 1")
    _need(frame >= ETH_HLEN, f"max_frame_bytes must be at least {ETH_HLEN}")
    _need(frame + vnet <= 0xFFFFFFFF, "max_frame_bytes + max_vnet_hdr_bytes must fit a u32")
    one_frame = HEADER_SIZE + _FRAMES_FIXED + _RECORD.size + vnet + frame
    _need(
        message >= max(MIN_MESSAGE_LIMIT, one_frame),
        f"max_message_bytes={message} must be at least {max(MIN_MESSAGE_LIMIT, one_frame)}"
        " (every control message and one maximal frame must fit)",
    )


DEFAULT_LIMITS: Final = Limits()


# --- events ---------------------------------------------------------------------------------


class Event:
    """Anything next_event() returns."""

    __slots__ = ()


class Message(Event):
    """An event that travels on the wire; ``TYPE`` is its header type byte."""

    __slots__ = ()
    TYPE: ClassVar[MsgType]


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed the byte stream. ``clean`` if it said BYE or ERROR first."""

    clean: bool


@dataclass(frozen=True, slots=True)
class NicSpec:
    nic_id: int  # u16, chosen by the leader; names the NIC in FRAMES, END and on both hosts
    tap: str  # this host's tap device
    mac: bytes  # 6 bytes, the guest NIC's unicast MAC
    rx_queues: int = 1


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """One frame as QEMU's filter-mirror writes it: ``data`` starts with the vnet header."""

    data: bytes
    vnet_hdr_len: int = 0

    @property
    def vnet_hdr(self) -> bytes:
        return self.data[: self.vnet_hdr_len]

    @property
    def payload(self) -> bytes:
        return self.data[self.vnet_hdr_len :]


@dataclass(frozen=True, slots=True)
class NicSummary:
    nic_id: int
    frame_count: int
    digest: bytes  # FrameDigest over the NIC's records, in order


@dataclass(frozen=True, slots=True)
class Hello(Message):
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    role: Role
    identity: str
    features: Feature = SUPPORTED_FEATURES
    version: tuple[int, int] = PROTOCOL_VERSION
    # What the sender of this HELLO accepts; the peer must stay within it.
    max_message_bytes: int = DEFAULT_LIMITS.max_message_bytes
    max_frames_per_batch: int = DEFAULT_LIMITS.max_frames_per_batch
    max_frame_bytes: int = DEFAULT_LIMITS.max_frame_bytes
    max_vnet_hdr_bytes: int = DEFAULT_LIMITS.max_vnet_hdr_bytes


@dataclass(frozen=True, slots=True)
class Prepare(Message):
    TYPE: ClassVar[MsgType] = MsgType.PREPARE
    migration_id: UUID
    vm_name: str
    nics: tuple[NicSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "nics", tuple(self.nics))


@dataclass(frozen=True, slots=True)
class Prepared(Message):
    TYPE: ClassVar[MsgType] = MsgType.PREPARED
    migration_id: UUID


@dataclass(frozen=True, slots=True)
class CaptureOn(Message):
    TYPE: ClassVar[MsgType] = MsgType.CAPTURE_ON
    migration_id: UUID


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Acknowledges CAPTURE_ON, END, ABORT, GIVE_BACK or (feature HOLD_ACK) HOLD."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    migration_id: UUID
    acked: MsgType


@dataclass(frozen=True, slots=True)
class VmStarted(Message):
    """The destination VM is running (QEMU's return-path "VM started" notice)."""

    TYPE: ClassVar[MsgType] = MsgType.VM_STARTED
    migration_id: UUID
    started_ns: int  # wall clock of the sender


@dataclass(frozen=True, slots=True)
class Frames(Message):
    TYPE: ClassVar[MsgType] = MsgType.FRAMES
    migration_id: UUID
    nic_id: int
    first_index: int  # index of frames[0] in this NIC's stream; streams start at 0
    frames: tuple[FrameRecord, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", tuple(self.frames))


@dataclass(frozen=True, slots=True)
class End(Message):
    TYPE: ClassVar[MsgType] = MsgType.END
    migration_id: UUID
    nics: tuple[NicSummary, ...]  # exactly the prepared NICs, in PREPARE order

    def __post_init__(self) -> None:
        object.__setattr__(self, "nics", tuple(self.nics))


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Cancel the migration: nobody injects the captured frames."""

    TYPE: ClassVar[MsgType] = MsgType.ABORT
    migration_id: UUID
    reason: str = ""


@dataclass(frozen=True, slots=True)
class GiveBack(Message):
    """The follower hands the captured frames back: the source re-injects them locally."""

    TYPE: ClassVar[MsgType] = MsgType.GIVE_BACK
    migration_id: UUID
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Counts(Message):
    TYPE: ClassVar[MsgType] = MsgType.COUNTS
    migration_id: UUID
    counters: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        items = self.counters.items() if isinstance(self.counters, Mapping) else self.counters
        object.__setattr__(self, "counters", tuple((k, v) for k, v in items))

    def as_dict(self) -> dict[str, int]:
        return dict(self.counters)


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE: ClassVar[MsgType] = MsgType.PING
    t1_ns: int  # sender's wall clock when sending


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE: ClassVar[MsgType] = MsgType.PONG
    t1_ns: int  # echoed from the PING
    t2_ns: int  # responder's wall clock when the PING arrived
    t3_ns: int  # responder's wall clock when sending the PONG


@dataclass(frozen=True, slots=True)
class Error(Message):
    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: int
    message: str = ""

    @classmethod
    def from_exception(cls, exc: ProtocolError) -> Error:
        """The ERROR to send after ``exc``: its code and message, cut to fit."""
        text = str(exc).encode()[:MAX_TEXT_BYTES].decode("utf-8", "ignore")
        return cls(exc.error_code, text)


@dataclass(frozen=True, slots=True)
class Bye(Message):
    TYPE: ClassVar[MsgType] = MsgType.BYE


# Version 1.1: the orchestrator tells each host's agent what QMP said (needs SWITCHOVER).


@dataclass(frozen=True, slots=True)
class NicFilter(Message):
    """The guest's receive filter for one prepared NIC, for the source agent's relay."""

    TYPE: ClassVar[MsgType] = MsgType.NIC_FILTER
    migration_id: UUID
    nic_id: int
    flags: NicFilterFlag
    multicast: tuple[bytes, ...] = ()  # 6-byte MACs with the multicast bit set
    unicast: tuple[bytes, ...] = ()  # 6-byte MACs without it

    def __post_init__(self) -> None:
        object.__setattr__(self, "multicast", tuple(self.multicast))
        object.__setattr__(self, "unicast", tuple(self.unicast))


@dataclass(frozen=True, slots=True)
class Peer(Message):
    """Where the source agent finds the destination agent for the frame channel."""

    TYPE: ClassVar[MsgType] = MsgType.PEER
    migration_id: UUID
    host: str  # host name or address to connect to
    port: int
    server_name: str  # the name its TLS certificate must carry ("" means host)


@dataclass(frozen=True, slots=True)
class UsedIdx(Message):
    """Virtio rx used-ring indices read from QEMU: (nic_id, used_idx) pairs."""

    TYPE: ClassVar[MsgType] = MsgType.USED_IDX
    migration_id: UUID
    phase: UsedPhase
    entries: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        items = self.entries.items() if isinstance(self.entries, Mapping) else self.entries
        object.__setattr__(self, "entries", tuple(items))


@dataclass(frozen=True, slots=True)
class Hold(Message):
    """The VM stopped: the destination agent closes its hold and flushes it."""

    TYPE: ClassVar[MsgType] = MsgType.HOLD
    migration_id: UUID


_MIGRATION_TYPES: Final = frozenset(
    {
        MsgType.PREPARE,
        MsgType.PREPARED,
        MsgType.CAPTURE_ON,
        MsgType.ACK,
        MsgType.VM_STARTED,
        MsgType.FRAMES,
        MsgType.END,
        MsgType.ABORT,
        MsgType.GIVE_BACK,
        MsgType.NIC_FILTER,
        MsgType.PEER,
        MsgType.USED_IDX,
        MsgType.HOLD,
    }
)
# Messages that need the SWITCHOVER feature.
_SWITCHOVER_TYPES: Final = frozenset(
    {MsgType.NIC_FILTER, MsgType.PEER, MsgType.USED_IDX, MsgType.HOLD}
)
# Migration messages a side may send more than once per migration (each with rules of its own).
_REPEATABLE: Final = frozenset({MsgType.FRAMES, MsgType.NIC_FILTER, MsgType.USED_IDX})
# Which roles may send each migration message at all; state rules come on top.
_SENDERS: Final[Mapping[MsgType, frozenset[Role]]] = {
    MsgType.PREPARE: _LEADERS,
    MsgType.PREPARED: _FOLLOWERS,
    MsgType.CAPTURE_ON: _LEADERS,
    MsgType.ACK: _ALL_ROLES,
    MsgType.VM_STARTED: frozenset({Role.ORCHESTRATOR, Role.AGENT, Role.DEST_AGENT}),
    MsgType.FRAMES: frozenset({Role.SOURCE_AGENT}),
    MsgType.END: frozenset({Role.SOURCE_AGENT, Role.AGENT}),
    MsgType.ABORT: _ALL_ROLES,
    MsgType.GIVE_BACK: _FOLLOWERS,
    MsgType.NIC_FILTER: frozenset({Role.ORCHESTRATOR}),
    MsgType.PEER: frozenset({Role.ORCHESTRATOR}),
    MsgType.USED_IDX: frozenset({Role.ORCHESTRATOR}),
    MsgType.HOLD: frozenset({Role.ORCHESTRATOR}),
}
_ACK_SENDERS: Final[Mapping[MsgType, frozenset[Role]]] = {
    MsgType.CAPTURE_ON: _FOLLOWERS,
    MsgType.END: frozenset({Role.ORCHESTRATOR, Role.DEST_AGENT}),
    MsgType.ABORT: _ALL_ROLES,
    MsgType.GIVE_BACK: _LEADERS,
    MsgType.HOLD: _FOLLOWERS,
}


# --- field validation (shared by encoder and decoder) ---------------------------------------


def _text(
    name: str, value: object, max_bytes: int, *, min_bytes: int = 0, printable: bool = False
) -> bytes:
    _need(isinstance(value, str), f"{name} must be a str, got {type(value).__name__}")
    assert isinstance(value, str)
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{name} is not encodable as UTF-8") from None
    _need(
        min_bytes <= len(raw) <= max_bytes,
        f"{name} must be {min_bytes}..{max_bytes} bytes of UTF-8, got {len(raw)}",
    )
    if printable:
        _need(value.isprintable(), f"{name} {value!r} contains non-printable characters")
    return raw


def _mid(value: object) -> None:
    _need(isinstance(value, UUID), f"migration_id must be a uuid.UUID, got {value!r}")


def _tap(name: str, value: object) -> None:
    _text(name, value, MAX_TAP_BYTES, min_bytes=1)
    assert isinstance(value, str)
    # Linux dev_valid_name(): no '/', ':' or whitespace, and not "." or "..".
    ok = value.isascii() and value.isprintable() and value not in (".", "..")
    _need(ok and not any(c in "/:" or c.isspace() for c in value), f"{name} {value!r} is invalid")


def _record(i: int, rec: object, lim: Limits) -> None:
    _need(isinstance(rec, FrameRecord), f"frame {i} must be a FrameRecord")
    assert isinstance(rec, FrameRecord)
    _need(isinstance(rec.data, (bytes, bytearray)), f"frame {i} data must be bytes")
    _uint(f"frame {i} vnet_hdr_len", rec.vnet_hdr_len, 32)
    _check_record_lengths(len(rec.data), rec.vnet_hdr_len, lim, ETH_HLEN, f"frame {i}")


def _check_record_lengths(total: int, vnet: int, lim: Limits, min_payload: int, what: str) -> None:
    _need(
        vnet <= lim.max_vnet_hdr_bytes,
        f"{what}: vnet header of {vnet} bytes exceeds {lim.max_vnet_hdr_bytes}",
        ErrorCode.LIMIT_EXCEEDED,
    )
    _need(vnet <= total, f"{what}: vnet header length {vnet} exceeds record length {total}")
    payload = total - vnet
    _need(
        payload <= lim.max_frame_bytes,
        f"{what}: {payload}-byte frame exceeds max_frame_bytes={lim.max_frame_bytes}",
        ErrorCode.LIMIT_EXCEEDED,
    )
    _need(payload >= min_payload, f"{what}: {payload}-byte frame is shorter than {min_payload}")


# What _encode_frames needs of a validated FRAMES: each record's data, vnet length and size.
_FrameFields = tuple[Sequence[bytes | bytearray], Sequence[int], Sequence[int]]
_BYTES_TYPES: Final = frozenset({bytes, bytearray})
_INT_ONLY: Final = frozenset({int})
_record_data: Final[Callable[[FrameRecord], bytes]] = operator.attrgetter("data")
_record_vnet: Final[Callable[[FrameRecord], int]] = operator.attrgetter("vnet_hdr_len")


def _frames_fields(msg: Frames, lim: Limits) -> _FrameFields:
    """Check every field of a FRAMES (as _validate does) and return what encoding needs.

    A batch carries thousands of records, so the common case is checked with C-level passes
    over the whole batch (map, min, max) instead of a Python call per record. Anything unusual
    (a subclass, a bad value) falls back to the per-record checks, which give the exact error.
    """
    _mid(msg.migration_id)
    _uint("nic_id", msg.nic_id, 16)
    _uint("first_index", msg.first_index, 64)
    frames = msg.frames
    n = len(frames)
    _need(n >= 1, "FRAMES must carry at least one frame")
    _need(
        n <= lim.max_frames_per_batch,
        f"FRAMES carries {n} frames; max_frames_per_batch={lim.max_frames_per_batch}",
        ErrorCode.LIMIT_EXCEEDED,
    )
    _uint("first_index + frame count", msg.first_index + n, 64)
    if set(map(type, frames)) == {FrameRecord}:
        datas = list(map(_record_data, frames))
        vnets = list(map(_record_vnet, frames))
        if set(map(type, datas)) <= _BYTES_TYPES and set(map(type, vnets)) == _INT_ONLY:
            lens = list(map(len, datas))
            # payload >= ETH_HLEN > 0 also gives vnet <= length; vnet <= max_vnet_hdr_bytes
            # (a u16) keeps it a u32.
            payloads = list(map(operator.sub, lens, vnets))
            if (
                min(vnets) >= 0
                and max(vnets) <= lim.max_vnet_hdr_bytes
                and min(payloads) >= ETH_HLEN
                and max(payloads) <= lim.max_frame_bytes
            ):
                return datas, vnets, lens
    for i, rec in enumerate(frames):
        _record(i, rec, lim)
    # Valid, but with subclasses the fast path does not vouch for.
    return [r.data for r in frames], [r.vnet_hdr_len for r in frames], [len(r.data) for r in frames]


def _validate(msg: Message, lim: Limits) -> None:
    """Check every field of ``msg`` against the spec and ``lim`` (no state involved)."""
    match msg:
        case Hello():
            _need(isinstance(msg.role, Role), f"HELLO role must be a Role, got {msg.role!r}")
            v = msg.version
            _need(isinstance(v, tuple) and len(v) == 2, f"version must be (major, minor): {v!r}")
            _uint("version major", v[0], 8)
            _uint("version minor", v[1], 8)
            _need(v[0] >= 1, "version major must be at least 1")
            _uint("features", msg.features, 32)
            _text("identity", msg.identity, MAX_IDENTITY_BYTES, min_bytes=1, printable=True)
            _check_limits(
                msg.max_message_bytes,
                msg.max_frames_per_batch,
                msg.max_frame_bytes,
                msg.max_vnet_hdr_bytes,
            )
        case Prepare():
            _mid(msg.migration_id)
            _text("vm_name", msg.vm_name, MAX_VM_NAME_BYTES, min_bytes=1, printable=True)
            _need(
                1 <= len(msg.nics) <= MAX_NICS,
                f"PREPARE must list 1..{MAX_NICS} NICs, got {len(msg.nics)}",
                ErrorCode.LIMIT_EXCEEDED,
            )
            for i, nic in enumerate(msg.nics):
                _need(isinstance(nic, NicSpec), f"nic {i} must be a NicSpec")
                _uint(f"nic {i} nic_id", nic.nic_id, 16)
                _tap(f"nic {i} tap", nic.tap)
                mac = nic.mac
                _need(isinstance(mac, bytes) and len(mac) == 6, f"nic {i} mac must be 6 bytes")
                _need(mac[0] & 1 == 0 and mac != bytes(6), f"nic {i} mac must be unicast")
                _uint(f"nic {i} rx_queues", nic.rx_queues, 16)
                _need(nic.rx_queues >= 1, f"nic {i} rx_queues must be at least 1")
            _need(len({n.nic_id for n in msg.nics}) == len(msg.nics), "PREPARE repeats a nic_id")
            _need(len({n.tap for n in msg.nics}) == len(msg.nics), "PREPARE repeats a tap")
        case Prepared() | CaptureOn():
            _mid(msg.migration_id)
        case Ack():
            _mid(msg.migration_id)
            _need(msg.acked in _ACK_SENDERS, f"ACK cannot acknowledge {msg.acked!r}")
        case VmStarted():
            _mid(msg.migration_id)
            _uint("started_ns", msg.started_ns, 64)
        case Frames():
            _frames_fields(msg, lim)
        case End():
            _mid(msg.migration_id)
            _need(
                1 <= len(msg.nics) <= MAX_NICS,
                f"END must list 1..{MAX_NICS} NICs, got {len(msg.nics)}",
                ErrorCode.LIMIT_EXCEEDED,
            )
            for i, s in enumerate(msg.nics):
                _need(isinstance(s, NicSummary), f"END entry {i} must be a NicSummary")
                _uint(f"END entry {i} nic_id", s.nic_id, 16)
                _uint(f"END entry {i} frame_count", s.frame_count, 64)
                ok = isinstance(s.digest, bytes) and len(s.digest) == DIGEST_SIZE
                _need(ok, f"END entry {i} digest must be {DIGEST_SIZE} bytes")
        case Abort() | GiveBack():
            _mid(msg.migration_id)
            _text("reason", msg.reason, MAX_TEXT_BYTES)
        case Counts():
            _mid(msg.migration_id)
            _need(
                len(msg.counters) <= MAX_COUNTERS,
                f"COUNTS carries {len(msg.counters)} counters; at most {MAX_COUNTERS}",
                ErrorCode.LIMIT_EXCEEDED,
            )
            for name, value in msg.counters:
                _text("counter name", name, MAX_COUNTER_NAME_BYTES, min_bytes=1)
                _need(
                    set(name) <= _COUNTER_NAME_CHARS,
                    f"counter name {name!r} may only use letters, digits and _.-",
                )
                _uint(f"counter {name}", value, 64)
            names = [name for name, _ in msg.counters]
            _need(len(set(names)) == len(names), "COUNTS repeats a counter name")
        case Ping():
            _uint("t1_ns", msg.t1_ns, 64)
        case Pong():
            _uint("t1_ns", msg.t1_ns, 64)
            _uint("t2_ns", msg.t2_ns, 64)
            _uint("t3_ns", msg.t3_ns, 64)
        case Error():
            _uint("ERROR code", msg.code, 16)
            _text("ERROR message", msg.message, MAX_TEXT_BYTES)
        case Bye():
            pass
        case NicFilter():
            _mid(msg.migration_id)
            _uint("nic_id", msg.nic_id, 16)
            _uint("NIC_FILTER flags", msg.flags, 8)
            unknown = int(msg.flags) & ~_NIC_FILTER_FLAGS
            _need(unknown == 0, f"NIC_FILTER flags has unknown bits 0x{unknown:02x}")
            _macs("multicast", msg.multicast, multicast=True)
            _macs("unicast", msg.unicast, multicast=False)
        case Peer():
            _mid(msg.migration_id)
            _text("host", msg.host, MAX_HOST_BYTES, min_bytes=1, printable=True)
            _uint("port", msg.port, 16)
            _need(msg.port >= 1, "port must be 1..65535, got 0")
            _text("server_name", msg.server_name, MAX_SERVER_NAME_BYTES, printable=True)
        case UsedIdx():
            _mid(msg.migration_id)
            _uint("USED_IDX phase", msg.phase, 8)
            _need(msg.phase in UsedPhase._value2member_map_, f"unknown USED_IDX phase {msg.phase}")
            n = len(msg.entries)
            _need(
                n <= MAX_USED_ENTRIES,
                f"USED_IDX carries {n} entries; at most {MAX_USED_ENTRIES}",
                ErrorCode.LIMIT_EXCEEDED,
            )
            for i, entry in enumerate(msg.entries):
                ok = isinstance(entry, tuple) and len(entry) == 2
                _need(ok, f"USED_IDX entry {i} must be a (nic_id, used_idx) pair")
                _uint(f"USED_IDX entry {i} nic_id", entry[0], 16)
                _uint(f"USED_IDX entry {i} used_idx", entry[1], 16)
            _need(len({e[0] for e in msg.entries}) == n, "USED_IDX repeats a nic_id")
        case Hold():
            _mid(msg.migration_id)
        case _:
            raise _Invalid(f"{type(msg).__name__} is not a netpass message")


def _macs(name: str, macs: object, *, multicast: bool) -> None:
    # A NIC_FILTER MAC list: the multicast bit (bit 0 of the first byte) tells the lists apart.
    _need(isinstance(macs, tuple), f"NIC_FILTER {name} must be a tuple of MACs")
    assert isinstance(macs, tuple)
    _need(
        len(macs) <= MAX_FILTER_MACS,
        f"NIC_FILTER lists {len(macs)} {name} MACs; at most {MAX_FILTER_MACS}",
        ErrorCode.LIMIT_EXCEEDED,
    )
    for i, mac in enumerate(macs):
        _need(isinstance(mac, bytes) and len(mac) == 6, f"{name} MAC {i} must be 6 bytes")
        _need(
            bool(mac[0] & 1) is multicast,
            f"{name} MAC {i} ({mac.hex(':')}) {'lacks' if multicast else 'has'} the multicast bit",
        )


# --- frame records (QEMU filter-mirror / filter-redirector stream layout) -------------------


def encode_frame_record(record: FrameRecord) -> bytes:
    """One record as filter-mirror writes it with vnet_hdr_support=on.

    Big-endian u32 length of ``record.data`` (vnet header included), big-endian u32 vnet
    header length, then ``record.data``.
    """
    n, vnet = len(record.data), record.vnet_hdr_len
    if not 0 <= vnet <= n or n > 0xFFFFFFFF:
        raise LocalProtocolError(f"vnet_hdr_len={vnet} does not fit a {n}-byte record")
    return _RECORD.pack(n, vnet) + bytes(record.data)


def decode_frame_records(
    data: bytes | bytearray | memoryview,
    *,
    start: int = 0,
    max_records: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    min_frame_bytes: int = 1,
    partial: bool = False,
) -> tuple[list[FrameRecord], int]:
    """Decode consecutive filter-mirror records from ``data[start:]``.

    Returns the records and how many bytes they used. Stops after ``max_records``. With
    ``partial`` an incomplete trailing record is left for the caller (a chardev stream read
    in chunks); otherwise it is an error. Lengths are checked against ``limits`` as soon as a
    record header is seen, so a corrupt length never makes the caller wait for gigabytes.
    Raises RemoteProtocolError.
    """
    try:
        return _decode_records(data, start, max_records, limits, min_frame_bytes, partial)
    except _Invalid as exc:
        raise RemoteProtocolError(str(exc), exc.code) from None


def _decode_records(
    data: bytes | bytearray | memoryview,
    start: int,
    max_records: int | None,
    lim: Limits,
    min_payload: int,
    partial: bool,
) -> tuple[list[FrameRecord], int]:
    pos, end = start, len(data)
    out: list[FrameRecord] = []
    while pos < end and (max_records is None or len(out) < max_records):
        if end - pos < _RECORD.size:
            if partial:
                break
            raise _Invalid(f"frame record {len(out)} truncated inside its 8-byte header")
        total, vnet = _RECORD.unpack_from(data, pos)
        _check_record_lengths(total, vnet, lim, min_payload, f"frame record {len(out)}")
        if end - pos - _RECORD.size < total:
            if partial:
                break
            raise _Invalid(
                f"frame record {len(out)} truncated: {total} bytes announced,"
                f" {end - pos - 8} present"
            )
        body = pos + _RECORD.size
        out.append(FrameRecord(bytes(data[body : body + total]), vnet))
        pos = body + total
    return out, pos - start


# Received records are built without FrameRecord.__init__: the frozen dataclass __init__ costs
# two object.__setattr__ calls per record, which C-level maps over __new__ and the slot
# descriptors avoid (about half the cost). FrameRecord has no __post_init__ to skip.
_new_record: Final[Callable[[type[FrameRecord]], FrameRecord]] = FrameRecord.__new__
_record_slots: Final = FrameRecord.__dict__  # its data and vnet_hdr_len slot descriptors
_set_record_data: Final[Callable[[FrameRecord, bytes], None]] = _record_slots["data"].__set__
_set_record_vnet: Final[Callable[[FrameRecord, int], None]] = _record_slots["vnet_hdr_len"].__set__


def _make_records(datas: list[bytes], vnets: list[int]) -> tuple[FrameRecord, ...]:
    records = tuple(map(_new_record, repeat(FrameRecord, len(datas))))
    any(map(_set_record_data, records, datas))  # the setters return None: any() runs them all
    any(map(_set_record_vnet, records, vnets))
    return records


def _decode_frames(body: bytes, lim: Limits) -> Frames:
    """Decode a FRAMES body and check everything _validate would check of it."""
    r = _Reader(body, MsgType.FRAMES)
    mid, nic_id, first = r.uuid(), r.u16("nic id"), r.u64("first index")
    count = r.u32("frame count")
    _need(
        count <= lim.max_frames_per_batch,
        f"FRAMES announces {count} frames; max_frames_per_batch={lim.max_frames_per_batch}",
        ErrorCode.LIMIT_EXCEEDED,
    )
    # One lean pass that only notices trouble: record headers in bounds and within the
    # limits, exactly ``count`` records filling the body. If anything is off, the precise
    # decoder runs again from the start and raises the exact error.
    datas: list[bytes] = []
    vnets: list[int] = []
    add_data, add_vnet, unpack = datas.append, vnets.append, _RECORD.unpack_from
    max_vnet, max_frame = lim.max_vnet_hdr_bytes, lim.max_frame_bytes
    pos, end = r.pos, len(body)
    ok = True
    for _ in range(count):
        if end - pos < 8:
            ok = False
            break
        total, vnet = unpack(body, pos)
        # ETH_HLEN <= total - vnet also rules out vnet > total.
        if vnet > max_vnet or not ETH_HLEN <= total - vnet <= max_frame:
            ok = False
            break
        pos += 8
        add_data(body[pos : pos + total])
        add_vnet(vnet)
        pos += total
    if ok and pos == end:
        records = _make_records(datas, vnets)
    else:
        slow, used = _decode_records(body, r.pos, count, lim, ETH_HLEN, False)
        _need(len(slow) == count, f"FRAMES announces {count} frames, carries {len(slow)}")
        r.skip_to(r.pos + used)
        r.done()
        records = tuple(slow)
    _uint("first_index + frame count", first + count, 64)
    return Frames(mid, nic_id, first, records)


# --- digests and clocks ---------------------------------------------------------------------


class FrameDigest:
    """Running count and SHA-256 over frame records, each hashed in its record layout.

    Both ends feed it the same frames in order; END carries (count, digest) so the receiver
    can prove it got exactly the captured sequence. Hashing the record layout rather than the
    bare bytes makes frame boundaries and vnet header lengths part of the proof, and lets a
    QEMU-filter backend hash its chardev stream as it comes.
    """

    __slots__ = ("_count", "_hash")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def update(self, record: FrameRecord) -> None:
        self._hash.update(_RECORD.pack(len(record.data), record.vnet_hdr_len))
        self._hash.update(record.data)
        self._count += 1

    def update_many(self, records: Iterable[FrameRecord]) -> None:
        for record in records:
            self.update(record)

    def update_encoded(self, records: bytes | bytearray | memoryview, count: int) -> None:
        """Add ``count`` records given in their wire layout, back to back.

        The same as update() on each, in one hash call: the hashed layout is the wire
        layout, so a FRAMES body's record bytes can be hashed as they are.
        """
        self._hash.update(records)
        self._count += count

    def digest(self) -> bytes:
        return self._hash.digest()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def summary(self, nic_id: int) -> NicSummary:
        return NicSummary(nic_id, self._count, self.digest())


@dataclass(frozen=True, slots=True)
class ClockSample:
    offset_ns: int  # peer clock minus local clock
    delay_ns: int  # round trip minus the peer's turnaround
    uncertainty_ns: int  # |true offset - offset_ns| <= this, if the paths are no faster than 0


def clock_offset(t1: int, t2: int, t3: int, t4: int) -> ClockSample:
    """NTP's on-wire estimate from one PING/PONG exchange.

    t1: PING sent (local clock), t2: PING received (peer), t3: PONG sent (peer),
    t4: PONG received (local). The true offset lies within delay/2 of the estimate because
    each one-way trip takes between 0 and the whole delay.
    """
    if t4 < t1 or t3 < t2:
        raise ValueError(f"timestamps run backwards: t1={t1} t2={t2} t3={t3} t4={t4}")
    delay = (t4 - t1) - (t3 - t2)
    if delay < 0:
        raise ValueError(f"peer turnaround {t3 - t2} ns exceeds the round trip {t4 - t1} ns")
    offset = ((t2 - t1) + (t3 - t4)) // 2
    return ClockSample(offset_ns=offset, delay_ns=delay, uncertainty_ns=(delay + 1) // 2)


# --- message codec --------------------------------------------------------------------------


def _pstr(raw: bytes) -> bytes:
    return _U16.pack(len(raw)) + raw


def _encode_body(msg: Message) -> bytes:
    # Assumes _validate() passed. FRAMES has its own encoder, _encode_frames.
    match msg:
        case Hello():
            major, minor = msg.version
            return struct.pack(
                ">HBIIIIH",
                major << 8 | minor,
                msg.role,
                msg.features,
                msg.max_message_bytes,
                msg.max_frames_per_batch,
                msg.max_frame_bytes,
                msg.max_vnet_hdr_bytes,
            ) + _pstr(msg.identity.encode())
        case Prepare():
            parts = [msg.migration_id.bytes, _pstr(msg.vm_name.encode()), _U16.pack(len(msg.nics))]
            for nic in msg.nics:
                parts.append(struct.pack(">HH6s", nic.nic_id, nic.rx_queues, nic.mac))
                parts.append(_pstr(nic.tap.encode()))
            return b"".join(parts)
        case Prepared() | CaptureOn():
            return msg.migration_id.bytes
        case Ack():
            return msg.migration_id.bytes + _U8.pack(msg.acked)
        case VmStarted():
            return msg.migration_id.bytes + _U64.pack(msg.started_ns)
        case End():
            entries = (struct.pack(">HQ32s", s.nic_id, s.frame_count, s.digest) for s in msg.nics)
            return msg.migration_id.bytes + _U16.pack(len(msg.nics)) + b"".join(entries)
        case Abort() | GiveBack():
            return msg.migration_id.bytes + _pstr(msg.reason.encode())
        case Counts():
            entries = (_pstr(k.encode()) + _U64.pack(v) for k, v in msg.counters)
            return msg.migration_id.bytes + _U16.pack(len(msg.counters)) + b"".join(entries)
        case Ping():
            return _U64.pack(msg.t1_ns)
        case Pong():
            return struct.pack(">QQQ", msg.t1_ns, msg.t2_ns, msg.t3_ns)
        case Error():
            return _U16.pack(msg.code) + _pstr(msg.message.encode())
        case Bye():
            return b""
        case NicFilter():
            return b"".join(
                (
                    msg.migration_id.bytes,
                    struct.pack(">HBH", msg.nic_id, msg.flags, len(msg.multicast)),
                    *msg.multicast,
                    _U16.pack(len(msg.unicast)),
                    *msg.unicast,
                )
            )
        case Peer():
            host, name = _pstr(msg.host.encode()), _pstr(msg.server_name.encode())
            return msg.migration_id.bytes + host + _U16.pack(msg.port) + name
        case UsedIdx():
            entries = (struct.pack(">HH", nic_id, used) for nic_id, used in msg.entries)
            head = struct.pack(">BH", msg.phase, len(msg.entries))
            return msg.migration_id.bytes + head + b"".join(entries)
        case Hold():
            return msg.migration_id.bytes
    raise _Invalid(f"{type(msg).__name__} is not a netpass message")


def _frame_header(t: MsgType, body_len: int) -> bytes:
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION[0], t, 0, body_len)


def _encode_frames(msg: Frames, fields: _FrameFields, lim: Limits) -> bytes:
    """The whole FRAMES message, from the fields _frames_fields() checked, in one join."""
    datas, vnets, lens = fields
    n = len(datas)
    body_len = _FRAMES_FIXED + _RECORD.size * n + sum(lens)
    _need(
        HEADER_SIZE + body_len <= lim.max_message_bytes,
        f"FRAMES would be {HEADER_SIZE + body_len} bytes; the limit is {lim.max_message_bytes}",
        ErrorCode.LIMIT_EXCEEDED,
    )
    parts: list[bytes | bytearray] = [b""] * (2 * n + 1)
    parts[0] = _FRAMES_PREFIX.pack(
        MAGIC,
        PROTOCOL_VERSION[0],
        MsgType.FRAMES,
        0,
        body_len,
        msg.migration_id.bytes,
        msg.nic_id,
        msg.first_index,
        n,
    )
    parts[1::2] = list(map(_RECORD.pack, lens, vnets))
    parts[2::2] = datas
    return b"".join(parts)


class _Reader:
    """Bounds-checked cursor over one message body."""

    __slots__ = ("_data", "_pos", "_type")

    def __init__(self, data: bytes, t: MsgType) -> None:
        self._data = data
        self._pos = 0
        self._type = t

    def _take(self, n: int, what: str) -> int:
        start = self._pos
        _need(
            n <= len(self._data) - start,
            f"{self._type.name} body truncated in {what}: need {n} bytes at offset {start},"
            f" {len(self._data) - start} left",
        )
        self._pos = start + n
        return start

    def u8(self, what: str) -> int:
        return int(self._data[self._take(1, what)])

    def u16(self, what: str) -> int:
        return int(_U16.unpack_from(self._data, self._take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(_U32.unpack_from(self._data, self._take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(_U64.unpack_from(self._data, self._take(8, what))[0])

    def raw(self, n: int, what: str) -> bytes:
        start = self._take(n, what)
        return self._data[start : start + n]

    def text(self, what: str) -> str:
        raw = self.raw(self.u16(f"{what} length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid(f"{self._type.name} {what} is not valid UTF-8") from None

    def uuid(self) -> UUID:
        return UUID(bytes=self.raw(16, "migration id"))

    @property
    def pos(self) -> int:
        return self._pos

    def skip_to(self, pos: int) -> None:
        self._pos = pos

    def done(self) -> None:
        left = len(self._data) - self._pos
        _need(left == 0, f"{left} unexpected trailing bytes in {self._type.name} body")


def _decode_body(t: MsgType, body: bytes, lim: Limits) -> Message:
    r = _Reader(body, t)
    msg: Message
    match t:
        case MsgType.HELLO:
            version = r.u16("version")
            role = r.u8("role")
            _need(role in Role._value2member_map_, f"HELLO names unknown role {role}")
            msg = Hello(
                role=Role(role),
                features=Feature(r.u32("features")),
                max_message_bytes=r.u32("max_message_bytes"),
                max_frames_per_batch=r.u32("max_frames_per_batch"),
                max_frame_bytes=r.u32("max_frame_bytes"),
                max_vnet_hdr_bytes=r.u16("max_vnet_hdr_bytes"),
                identity=r.text("identity"),
                version=(version >> 8, version & 0xFF),
            )
        case MsgType.PREPARE:
            mid, vm = r.uuid(), r.text("vm name")
            count = r.u16("nic count")
            _need(count <= MAX_NICS, f"PREPARE lists {count} NICs; at most {MAX_NICS}")
            nics = []
            for i in range(count):
                nic_id, rxq = r.u16(f"nic {i} id"), r.u16(f"nic {i} rx queues")
                mac = r.raw(6, f"nic {i} mac")
                nics.append(NicSpec(nic_id, r.text(f"nic {i} tap"), mac, rxq))
            msg = Prepare(mid, vm, tuple(nics))
        case MsgType.PREPARED:
            msg = Prepared(r.uuid())
        case MsgType.CAPTURE_ON:
            msg = CaptureOn(r.uuid())
        case MsgType.ACK:
            mid, acked = r.uuid(), r.u8("acked type")
            _need(acked in _ACK_SENDERS, f"ACK of message type 0x{acked:02x}, which takes none")
            msg = Ack(mid, MsgType(acked))
        case MsgType.VM_STARTED:
            msg = VmStarted(r.uuid(), r.u64("started_ns"))
        case MsgType.FRAMES:
            return _decode_frames(body, lim)  # checks all that _validate would
        case MsgType.END:
            mid, count = r.uuid(), r.u16("nic count")
            _need(count <= MAX_NICS, f"END lists {count} NICs; at most {MAX_NICS}")
            summaries = []
            for i in range(count):
                nic_id, frames = r.u16(f"entry {i} nic id"), r.u64(f"entry {i} frame count")
                summaries.append(
                    NicSummary(nic_id, frames, r.raw(DIGEST_SIZE, f"entry {i} digest"))
                )
            msg = End(mid, tuple(summaries))
        case MsgType.ABORT:
            msg = Abort(r.uuid(), r.text("reason"))
        case MsgType.GIVE_BACK:
            msg = GiveBack(r.uuid(), r.text("reason"))
        case MsgType.COUNTS:
            mid, count = r.uuid(), r.u16("counter count")
            _need(count <= MAX_COUNTERS, f"COUNTS carries {count} counters; at most {MAX_COUNTERS}")
            counters = []
            for i in range(count):
                name = r.text(f"counter {i} name")
                counters.append((name, r.u64(f"counter {i} value")))
            msg = Counts(mid, tuple(counters))
        case MsgType.PING:
            msg = Ping(r.u64("t1"))
        case MsgType.PONG:
            msg = Pong(r.u64("t1"), r.u64("t2"), r.u64("t3"))
        case MsgType.ERROR:
            msg = Error(r.u16("code"), r.text("message"))
        case MsgType.BYE:
            msg = Bye()
        case MsgType.NIC_FILTER:
            mid, nic_id, flags = r.uuid(), r.u16("nic id"), r.u8("flags")
            lists = []
            for what in ("multicast", "unicast"):
                count = r.u16(f"{what} count")
                _need(
                    count <= MAX_FILTER_MACS,
                    f"NIC_FILTER lists {count} {what} MACs; at most {MAX_FILTER_MACS}",
                )
                raw = r.raw(6 * count, f"{what} MACs")
                lists.append(tuple(raw[i : i + 6] for i in range(0, len(raw), 6)))
            msg = NicFilter(mid, nic_id, NicFilterFlag(flags), lists[0], lists[1])
        case MsgType.PEER:
            mid, host, port = r.uuid(), r.text("host"), r.u16("port")
            msg = Peer(mid, host, port, r.text("server name"))
        case MsgType.USED_IDX:
            mid, phase = r.uuid(), r.u8("phase")
            _need(phase in UsedPhase._value2member_map_, f"USED_IDX names unknown phase {phase}")
            count = r.u16("entry count")
            _need(
                count <= MAX_USED_ENTRIES,
                f"USED_IDX carries {count} entries; at most {MAX_USED_ENTRIES}",
            )
            entries = []
            for i in range(count):
                entries.append((r.u16(f"entry {i} nic id"), r.u16(f"entry {i} used idx")))
            msg = UsedIdx(mid, UsedPhase(phase), tuple(entries))
        case MsgType.HOLD:
            msg = Hold(r.uuid())
    r.done()
    _validate(msg, lim)
    return msg


def _body_bounds(t: MsgType, lim: Limits) -> tuple[int, int]:
    """Smallest and largest legal body of type ``t``, so a header can be judged on arrival."""
    if t is MsgType.FRAMES:
        largest = _FRAMES_FIXED + lim.max_frames_per_batch * (
            _RECORD.size + lim.max_vnet_hdr_bytes + lim.max_frame_bytes
        )
        hi = min(lim.max_message_bytes - HEADER_SIZE, largest)
        return _FRAMES_FIXED + _RECORD.size + ETH_HLEN, hi
    return _BODY_BOUNDS[t]


_NIC_ENTRY_MIN: Final = 2 + 2 + 6 + 2 + 1
_BODY_BOUNDS: Final[Mapping[MsgType, tuple[int, int]]] = {
    MsgType.HELLO: (24, 23 + MAX_IDENTITY_BYTES),
    MsgType.PREPARE: (
        16 + 2 + 1 + 2 + _NIC_ENTRY_MIN,
        16 + 2 + MAX_VM_NAME_BYTES + 2 + MAX_NICS * (_NIC_ENTRY_MIN - 1 + MAX_TAP_BYTES),
    ),
    MsgType.PREPARED: (16, 16),
    MsgType.CAPTURE_ON: (16, 16),
    MsgType.ACK: (17, 17),
    MsgType.VM_STARTED: (24, 24),
    MsgType.END: (16 + 2 + 42, 16 + 2 + MAX_NICS * 42),
    MsgType.ABORT: (18, 18 + MAX_TEXT_BYTES),
    MsgType.GIVE_BACK: (18, 18 + MAX_TEXT_BYTES),
    MsgType.COUNTS: (18, 18 + MAX_COUNTERS * (2 + MAX_COUNTER_NAME_BYTES + 8)),
    MsgType.PING: (8, 8),
    MsgType.PONG: (24, 24),
    MsgType.ERROR: (4, 4 + MAX_TEXT_BYTES),
    MsgType.BYE: (0, 0),
    MsgType.NIC_FILTER: (16 + 2 + 1 + 2 + 2, 16 + 2 + 1 + 2 * (2 + MAX_FILTER_MACS * 6)),
    MsgType.PEER: (16 + 2 + 1 + 2 + 2, 16 + 2 + MAX_HOST_BYTES + 2 + 2 + MAX_SERVER_NAME_BYTES),
    MsgType.USED_IDX: (16 + 1 + 2, 16 + 1 + 2 + MAX_USED_ENTRIES * 4),
    MsgType.HOLD: (16, 16),
}
assert all(HEADER_SIZE + hi <= MIN_MESSAGE_LIMIT for _, hi in _BODY_BOUNDS.values())


def encode_message(msg: Message, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Header + body of one message, with field checks but no state (see Connection.send)."""
    try:
        return _encode_checked(msg, limits)
    except _Invalid as exc:
        raise LocalProtocolError(str(exc), exc.code) from None


def _encode_checked(msg: Message, lim: Limits) -> bytes:
    if isinstance(msg, Frames):
        return _encode_frames(msg, _frames_fields(msg, lim), lim)
    _validate(msg, lim)
    return _encode_valid(msg, lim)


def _encode_valid(msg: Message, lim: Limits) -> bytes:
    # For a message that passed _validate(): only the size is left to check.
    body = _encode_body(msg)
    size = HEADER_SIZE + len(body)
    _need(
        size <= lim.max_message_bytes,
        f"{msg.TYPE.name} would be {size} bytes; the limit is {lim.max_message_bytes}",
        ErrorCode.LIMIT_EXCEEDED,
    )
    return _frame_header(msg.TYPE, len(body)) + body


def decode_message(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode exactly one whole message, without state checks. Raises RemoteProtocolError."""
    try:
        _need(len(data) >= HEADER_SIZE, f"{len(data)} bytes is shorter than a header")
        t, length = _parse_header(data, 0, limits)
        _need(len(data) == HEADER_SIZE + length, f"{t.name} announces {length} body bytes")
        return _decode_body(t, bytes(data[HEADER_SIZE:]), limits)
    except _Invalid as exc:
        raise RemoteProtocolError(str(exc), exc.code) from None


def _parse_header(buf: bytes | bytearray, pos: int, lim: Limits) -> tuple[MsgType, int]:
    magic, major, raw_type, flags, length = _HEADER.unpack_from(buf, pos)
    _need(magic == MAGIC, f"bad magic {bytes(magic)!r}: the peer does not speak netpass")
    known = raw_type in MsgType._value2member_map_
    # The header and the ERROR body are frozen across major versions, so a peer refusing our
    # version can still say why.
    if major != PROTOCOL_VERSION[0] and not (known and raw_type == MsgType.ERROR):
        raise _Invalid(
            f"peer speaks netpass wire protocol {major}.x; this side supports only"
            f" {PROTOCOL_VERSION[0]}.x",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    _need(known, f"unknown message type 0x{raw_type:02x}", ErrorCode.UNKNOWN_MESSAGE)
    t = MsgType(raw_type)
    _need(flags == 0, f"{t.name} has unknown flags 0x{flags:04x}")
    lo, hi = _body_bounds(t, lim)
    _need(length <= hi, f"{t.name} body of {length} bytes exceeds {hi}", ErrorCode.LIMIT_EXCEEDED)
    _need(length >= lo, f"{t.name} body of {length} bytes is shorter than {lo}")
    return t, length


# --- the state machine ----------------------------------------------------------------------

_ACK_BIT: Final = 0x100


def _key(msg: Message) -> int:
    # What a side "has sent" in a migration: the type, or type | acked type for ACK.
    return _ACK_BIT | msg.acked if isinstance(msg, Ack) else int(msg.TYPE)


_ACKED_CAPTURE: Final = _ACK_BIT | MsgType.CAPTURE_ON
# Keys beyond the message types and ACKs: NIC_FILTER sent for a NIC, USED_IDX sent in a phase.
_FILTER_BIT: Final = 0x10000  # | nic_id
_PHASE_BIT: Final = 0x20000  # | phase
_ENDING: Final = frozenset({MsgType.ABORT, MsgType.GIVE_BACK})
# A migration is closed on a side once it has sent one of these and received one.
_CLOSING: Final = frozenset(
    {
        int(MsgType.END),
        int(MsgType.ABORT),
        int(MsgType.GIVE_BACK),
        _ACK_BIT | MsgType.END,
        _ACK_BIT | MsgType.ABORT,
        _ACK_BIT | MsgType.GIVE_BACK,
    }
)
_RECENT_MIGRATIONS: Final = 16


class _Side:
    """What one end has sent; our view of the peer's receptions is what we sent."""

    __slots__ = ("closed_by", "error", "hello", "is_us", "pings", "role", "sent")

    def __init__(self, role: Role, is_us: bool) -> None:
        self.role = role
        self.is_us = is_us
        self.hello: Hello | None = None
        self.closed_by: str | None = None  # "BYE", "ERROR" or "EOF"
        self.error: ProtocolError | None = None
        self.pings: deque[int] = deque()  # t1 of PINGs this side sent, not yet answered
        self.sent: set[int] = set()  # keys sent in the current migration


class _Migration:
    __slots__ = ("digests", "mid")

    def __init__(self, prepare: Prepare) -> None:
        self.mid = prepare.migration_id
        # One digest per NIC, in PREPARE order: the frames seen on this connection.
        self.digests = {nic.nic_id: FrameDigest() for nic in prepare.nics}


class Connection:
    """One end of a netpass connection. See the module docstring and docs/protocol.md."""

    def __init__(self, our_role: Role, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self.our_role = Role(our_role)
        self.their_role = self.our_role.peer
        self.limits = limits
        self._us = _Side(self.our_role, True)
        self._them = _Side(self.their_role, False)
        self._mig: _Migration | None = None
        self._recent: deque[UUID] = deque(maxlen=_RECENT_MIGRATIONS)
        self._features = Feature.NONE
        self._version: tuple[int, int] | None = None
        self._peer_limits: Limits | None = None
        self._buf = bytearray()
        self._start = 0
        self._eof = False
        self._closed_delivered = False

    # -- introspection --

    @property
    def our_state(self) -> State:
        return self._state_of(self._us, self._them)

    @property
    def their_state(self) -> State:
        return self._state_of(self._them, self._us)

    @property
    def peer_hello(self) -> Hello | None:
        return self._them.hello

    @property
    def negotiated_features(self) -> Feature | None:
        """Features both sides announced; None until both HELLOs are exchanged."""
        return self._features if self._version is not None else None

    @property
    def negotiated_version(self) -> tuple[int, int] | None:
        return self._version

    @property
    def migration_id(self) -> UUID | None:
        """The current (or last, once closed) migration on this connection."""
        return self._mig.mid if self._mig is not None else None

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf) - self._start

    def make_hello(self, identity: str, features: Feature = SUPPORTED_FEATURES) -> Hello:
        """Our HELLO, announcing this connection's limits."""
        lim = self.limits
        return Hello(
            role=self.our_role,
            identity=identity,
            features=features,
            max_message_bytes=lim.max_message_bytes,
            max_frames_per_batch=lim.max_frames_per_batch,
            max_frame_bytes=lim.max_frame_bytes,
            max_vnet_hdr_bytes=lim.max_vnet_hdr_bytes,
        )

    def next_frame_index(self, nic_id: int) -> int:
        """How many frames of ``nic_id`` went over this connection in the current migration."""
        mig = self._current_migration()
        if nic_id not in mig.digests:
            raise LocalProtocolError(f"nic {nic_id} is not part of migration {mig.mid}")
        return mig.digests[nic_id].count

    def frame_summaries(self) -> tuple[NicSummary, ...]:
        """Count and digest per prepared NIC of the FRAMES seen so far: what END must carry."""
        mig = self._current_migration()
        return tuple(d.summary(nic_id) for nic_id, d in mig.digests.items())

    def batch_frames(self, nic_id: int, records: Iterable[FrameRecord]) -> list[Frames]:
        """Split ``records`` into FRAMES events that fit the peer's limits, indexed in order.

        Send them in the order returned, before any other FRAMES for this NIC.
        """
        mig = self._current_migration()
        if nic_id not in mig.digests:
            raise LocalProtocolError(f"nic {nic_id} is not part of migration {mig.mid}")
        lim = self._peer_limits or self.limits
        room = lim.max_message_bytes - HEADER_SIZE - _FRAMES_FIXED
        index = mig.digests[nic_id].count
        out: list[Frames] = []
        batch: list[FrameRecord] = []
        size = 0
        for rec in records:
            rec_size = _RECORD.size + len(rec.data)
            if batch and (len(batch) == lim.max_frames_per_batch or size + rec_size > room):
                out.append(Frames(mig.mid, nic_id, index, tuple(batch)))
                index += len(batch)
                batch, size = [], 0
            batch.append(rec)
            size += rec_size
        if batch:
            out.append(Frames(mig.mid, nic_id, index, tuple(batch)))
        return out

    # -- sending --

    def send(self, event: Message) -> bytes:
        """Bytes to write for ``event``; raises LocalProtocolError if it is not allowed now."""
        if self._us.error is not None and not isinstance(event, Error):
            raise LocalProtocolError(f"connection already failed locally: {self._us.error}")
        if self._them.error is not None and not isinstance(event, Error):
            raise LocalProtocolError("the peer broke the protocol; only ERROR may be sent now")
        try:
            data = self._prepare_send(event)
        except _Invalid as exc:
            err = LocalProtocolError(str(exc), exc.code)
            self._us.error = err
            raise err from None
        if isinstance(event, Frames):
            # The digest covers the records in their wire layout: hash them as encoded.
            records = memoryview(data)[HEADER_SIZE + _FRAMES_FIXED :]
            self._apply(self._us, self._them, event, records)
        else:
            self._apply(self._us, self._them, event)
        return data

    def can_send(self, event: Message) -> bool:
        """Whether send(event) would succeed now (and not break the connection)."""
        if self._us.error is not None or self._them.error is not None:
            return isinstance(event, Error) and self._us.closed_by is None
        try:
            self._prepare_send(event)
        except _Invalid:
            return False
        return True

    def _prepare_send(self, event: Message) -> bytes:
        # Fields first, then state, then size: each message is checked once.
        _need(isinstance(event, Message), f"cannot send {type(event).__name__}")
        lim = self._peer_limits or self.limits
        if isinstance(event, Frames):
            fields = _frames_fields(event, lim)
            self._check(self._us, self._them, event)
            return _encode_frames(event, fields, lim)
        _validate(event, lim)
        self._check(self._us, self._them, event)
        if isinstance(event, Hello):
            lim = self.limits
        return _encode_valid(event, lim)

    # -- receiving --

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer; ``b""`` means the peer closed the stream."""
        if self._them.error is not None:
            raise self._them.error
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() called with data after EOF")
            return
        if not data:
            self._eof = True
            return
        held = len(self._buf) - self._start
        if held + len(data) > self.limits.max_buffer_bytes:
            self._fail_remote(
                _Invalid(
                    f"peer sent {held + len(data)} unconsumed bytes; max_buffer_bytes="
                    f"{self.limits.max_buffer_bytes} (call next_event() between reads)",
                    ErrorCode.LIMIT_EXCEEDED,
                )
            )
        if self._start:
            del self._buf[: self._start]
            self._start = 0
        self._buf += data

    def next_event(self) -> Event | Sentinel:
        """The next event, NEED_DATA, or PAUSED once the peer has finished for good."""
        if self._them.error is not None:
            raise self._them.error
        try:
            return self._next_event()
        except _Invalid as exc:
            self._fail_remote(exc)

    def _fail_remote(self, exc: _Invalid) -> NoReturn:
        err = RemoteProtocolError(str(exc), exc.code)
        self._them.error = err
        raise err from None

    def _next_event(self) -> Event | Sentinel:
        if self._closed_delivered:
            return PAUSED
        them = self._them
        avail = len(self._buf) - self._start
        if them.closed_by is not None:
            _need(avail == 0, f"{avail} bytes after {them.closed_by}", ErrorCode.UNEXPECTED_MESSAGE)
            if self._eof:
                self._closed_delivered = True
                return ConnectionClosed(clean=True)
            return NEED_DATA
        if avail < HEADER_SIZE:
            if not self._eof:
                return NEED_DATA
            _need(avail == 0, f"stream ended inside a message header ({avail} of 12 bytes)")
            them.closed_by = "EOF"
            self._closed_delivered = True
            return ConnectionClosed(clean=False)
        t, length = _parse_header(self._buf, self._start, self.limits)
        self._precheck(t)
        total = HEADER_SIZE + length
        if avail < total:
            _need(not self._eof, f"stream ended inside {t.name} ({avail} of {total} bytes)")
            return NEED_DATA
        body_at = self._start + HEADER_SIZE
        # One copy of the body. Slicing the records out of a bytes object costs less than
        # copying each out of a memoryview, so this copy pays for itself.
        with memoryview(self._buf) as view:
            body = view[body_at : body_at + length].tobytes()
        self._start += total
        if self._start == len(self._buf):
            self._buf.clear()
            self._start = 0
        if t is MsgType.FRAMES:
            frames = _decode_frames(body, self.limits)
            self._check(them, self._us, frames)
            self._apply(them, self._us, frames, memoryview(body)[_FRAMES_FIXED:])
            return frames
        msg = _decode_body(t, body, self.limits)
        self._check(them, self._us, msg)
        self._apply(them, self._us, msg)
        return msg

    def _precheck(self, t: MsgType) -> None:
        # Type-only checks on a header, so a big body that could never be legal is refused
        # before it is buffered.
        them = self._them
        if t in (MsgType.HELLO, MsgType.ERROR):
            return
        _need(them.hello is not None, f"{them.role.name} sent {t.name} before HELLO", _UNEXP)
        _need(self._us.hello is not None, f"{t.name} arrived before we sent HELLO", _UNEXP)
        if t in _SWITCHOVER_TYPES:
            self._check_switchover(t)
        senders = _SENDERS.get(t, _ALL_ROLES)
        _need(them.role in senders, f"{them.role.name} may not send {t.name}", _UNEXP)

    # -- rules --

    def _current_migration(self) -> _Migration:
        if self._mig is None:
            raise LocalProtocolError("no migration has been prepared on this connection")
        return self._mig

    def _open_at(self, s: _Side, o: _Side) -> bool:
        if self._mig is None or (s.sent & _CLOSING and o.sent & _CLOSING):
            return False
        # A peer follower that has sent nothing in this migration may not have received the
        # PREPARE yet, so it cannot be blamed for acting as if no migration were open.
        return s.is_us or bool(s.sent)

    def _state_of(self, s: _Side, o: _Side) -> State:
        if s.error is not None:
            return State.ERROR
        if s.closed_by is not None:
            return State.CLOSED
        if s.hello is None:
            return State.START
        if self._mig is None:
            return State.IDLE
        if s.sent & _CLOSING:
            return State.IDLE if o.sent & _CLOSING else State.CLOSING
        if MsgType.CAPTURE_ON in s.sent or _ACKED_CAPTURE in s.sent:
            return State.CAPTURING
        if MsgType.PREPARE in s.sent:
            return State.PREPARING
        if MsgType.PREPARED in s.sent:
            return State.PREPARED
        return State.IDLE

    def _check(self, s: _Side, o: _Side, msg: Message) -> None:
        """May side ``s`` send ``msg`` now? ``o.sent`` stands for what ``s`` has received.

        For our own sends that is exact. For the peer's it is an upper bound (our messages
        may still be in flight), so rules only ever *require* having received something;
        "must not have received X" is enforced on our sends alone.
        """
        t = msg.TYPE
        who = s.role.name
        _need(s.closed_by is None, f"{who} sent {t.name} after {s.closed_by}", _UNEXP)
        if t is MsgType.ERROR:
            return
        if isinstance(msg, Hello):
            _need(s.hello is None, f"{who} sent HELLO twice", _UNEXP)
            _need(
                msg.role is s.role,
                f"HELLO from {msg.role.name}, but a {o.role.name} talks only to {s.role.name}",
                ErrorCode.BAD_ROLE,
            )
            _need(
                msg.version[0] == PROTOCOL_VERSION[0],
                f"HELLO announces version {msg.version[0]}.{msg.version[1]}; this side"
                f" supports only {PROTOCOL_VERSION[0]}.x",
                ErrorCode.UNSUPPORTED_VERSION,
            )
            if s.is_us:
                _need(msg.version[1] <= PROTOCOL_VERSION[1], "cannot announce a newer minor")
                # int(): ~ on an IntFlag would only invert the bits it knows.
                unknown = int(msg.features) & ~int(SUPPORTED_FEATURES)
                _need(unknown == 0, f"cannot announce unknown features 0x{unknown:x}")
                newer = Feature(int(msg.features) & ~int(_features_of(msg.version[1])))
                _need(
                    not newer,
                    f"a version {msg.version[0]}.{msg.version[1]} HELLO cannot announce"
                    f" {newer!r}, which a later minor version defines",
                )
                lim = self.limits
                _need(
                    msg.max_message_bytes <= lim.max_message_bytes
                    and msg.max_frames_per_batch <= lim.max_frames_per_batch
                    and msg.max_frame_bytes <= lim.max_frame_bytes
                    and msg.max_vnet_hdr_bytes <= lim.max_vnet_hdr_bytes,
                    "HELLO announces limits beyond this Connection's Limits",
                    ErrorCode.LIMIT_EXCEEDED,
                )
            return
        _need(s.hello is not None, f"{who} sent {t.name} before HELLO", _UNEXP)
        _need(o.hello is not None, f"{who} sent {t.name} before receiving HELLO", _UNEXP)
        if isinstance(msg, Ping):
            _need(
                len(s.pings) < MAX_PENDING_PINGS,
                f"{who} has {MAX_PENDING_PINGS} PINGs unanswered",
                ErrorCode.LIMIT_EXCEEDED,
            )
            return
        if isinstance(msg, Pong):
            _need(bool(o.pings), f"{who} sent PONG without an unanswered PING", _UNEXP)
            _need(msg.t1_ns == o.pings[0], f"{who} PONG does not echo the oldest PING", _UNEXP)
            return
        if isinstance(msg, Counts):
            _need(
                Feature.COUNTS in self._features,
                "COUNTS needs the COUNTS feature on both sides",
                ErrorCode.FEATURE_NOT_NEGOTIATED,
            )
            _need(msg.migration_id in self._recent, "COUNTS for an unknown migration", _UNEXP)
            return
        if isinstance(msg, Bye):
            _need(
                not self._open_at(s, o),
                f"{who} sent BYE while migration {self.migration_id} is open (ABORT it first)",
                _UNEXP,
            )
            return
        if t in _SWITCHOVER_TYPES:
            self._check_switchover(t)
        _need(s.role in _SENDERS[t], f"{who} may not send {t.name}", _UNEXP)
        if isinstance(msg, Prepare):
            _need(
                not self._open_at(s, o),
                f"{who} sent PREPARE while migration {self.migration_id} is open",
                _UNEXP,
            )
            _need(msg.migration_id not in self._recent, "PREPARE reuses a migration id", _UNEXP)
            return
        self._check_migration(s, o, msg)

    def _check_migration(self, s: _Side, o: _Side, msg: Message) -> None:
        t = msg.TYPE
        who = s.role.name
        mig = self._mig
        mid = getattr(msg, "migration_id", None)
        _need(
            mig is not None and mid == mig.mid,
            f"{who} sent {t.name} for migration {mid}, which is not the current one",
            _UNEXP,
        )
        assert mig is not None
        key = _key(msg)
        _need(not s.sent & _CLOSING, f"{who} sent {t.name} after closing the migration", _UNEXP)
        _need(key not in s.sent or t in _REPEATABLE, f"{who} sent {t.name} twice", _UNEXP)
        if s.is_us and o.sent & _ENDING:
            ended = sorted(MsgType(k).name for k in o.sent & _ENDING)
            acks = {_ACK_BIT | MsgType[name] for name in ended}
            _need(key in acks, f"the peer sent {'+'.join(ended)}; only ACK it", _UNEXP)
        acked_capture = _ACKED_CAPTURE in (o.sent if s.role.leads else s.sent)
        match msg:
            case Prepared():
                pass  # the migration exists, so PREPARE was received
            case CaptureOn():
                _need(MsgType.PREPARED in o.sent, f"{who} sent CAPTURE_ON before PREPARED", _UNEXP)
            case Ack():
                a = msg.acked
                _need(s.role in _ACK_SENDERS[a], f"{who} may not ACK {a.name}", _UNEXP)
                _need(a in o.sent, f"{who} acknowledged {a.name}, which was never sent", _UNEXP)
                if a is MsgType.CAPTURE_ON:
                    _need(MsgType.PREPARED in s.sent, f"{who} ACKed CAPTURE_ON unprepared", _UNEXP)
                if a is MsgType.HOLD:
                    _need(
                        Feature.HOLD_ACK in self._features,
                        "ACK(HOLD) needs the HOLD_ACK feature on both sides (protocol 1.2)",
                        ErrorCode.FEATURE_NOT_NEGOTIATED,
                    )
            case VmStarted() | End() | GiveBack():
                _need(acked_capture, f"{who} sent {t.name} before capture was armed", _UNEXP)
                if isinstance(msg, End):
                    self._check_end(s, msg, mig)
            case Frames():
                _need(acked_capture, f"{who} sent FRAMES before CAPTURE_ON was ACKed", _UNEXP)
                self._check_frames(msg, mig)
            case Abort():
                pass
            case NicFilter() | Peer():
                armed = MsgType.CAPTURE_ON in s.sent
                _need(not armed, f"{who} sent {t.name} after CAPTURE_ON", _UNEXP)
                if isinstance(msg, NicFilter):
                    self._check_nic_filter(s, msg, mig)
            case UsedIdx():
                _need(acked_capture, f"{who} sent USED_IDX before CAPTURE_ON was ACKed", _UNEXP)
                self._check_used_idx(s, msg, mig)
            case Hold():
                _need(acked_capture, f"{who} sent HOLD before CAPTURE_ON was ACKed", _UNEXP)

    def _check_switchover(self, t: MsgType) -> None:
        _need(
            Feature.SWITCHOVER in self._features,
            f"{t.name} needs the SWITCHOVER feature on both sides (protocol 1.1)",
            ErrorCode.FEATURE_NOT_NEGOTIATED,
        )

    def _check_nic_filter(self, s: _Side, msg: NicFilter, mig: _Migration) -> None:
        nic = msg.nic_id
        _need(nic in mig.digests, f"NIC_FILTER for nic {nic}, which was not prepared", _UNEXP)
        _need(
            (_FILTER_BIT | nic) not in s.sent,
            f"{s.role.name} sent NIC_FILTER for nic {nic} twice",
            _UNEXP,
        )

    def _check_used_idx(self, s: _Side, msg: UsedIdx, mig: _Migration) -> None:
        who, phase = s.role.name, UsedPhase(msg.phase)
        ids = [nic_id for nic_id, _ in msg.entries]
        unknown = [nic_id for nic_id in ids if nic_id not in mig.digests]
        if unknown:
            raise _Invalid(f"USED_IDX for nic {unknown[0]}, which was not prepared", _UNEXP)
        if phase in (UsedPhase.BASELINE, UsedPhase.FINAL):
            # The nic_ids are prepared and unique, so equal counts mean all of them.
            _need(
                len(ids) == len(mig.digests),
                f"USED_IDX({phase.name}) lists nics {ids}; it must list every prepared NIC"
                f" {list(mig.digests)}",
            )
        later = [p for p in UsedPhase if p > phase and (_PHASE_BIT | p) in s.sent]
        if later:
            raise _Invalid(
                f"{who} sent USED_IDX({phase.name}) after USED_IDX({later[-1].name}):"
                " phases only move forward",
                _UNEXP,
            )
        _need(
            phase is UsedPhase.OBSERVE or (_PHASE_BIT | phase) not in s.sent,
            f"{who} sent USED_IDX({phase.name}) twice",
            _UNEXP,
        )

    def _check_frames(self, msg: Frames, mig: _Migration) -> None:
        digest = mig.digests.get(msg.nic_id)
        _need(digest is not None, f"FRAMES for nic {msg.nic_id}, which was not prepared", _UNEXP)
        assert digest is not None
        _need(
            msg.first_index == digest.count,
            f"FRAMES for nic {msg.nic_id} starts at index {msg.first_index}; expected"
            f" {digest.count} (frames lost, repeated or reordered)",
            ErrorCode.INTEGRITY,
        )
        if Feature.VNET_HDR not in self._features:
            _need(
                not any(map(_record_vnet, msg.frames)),  # all >= 0 once fields are checked
                "frame with a vnet header, but VNET_HDR was not negotiated",
                ErrorCode.FEATURE_NOT_NEGOTIATED,
            )

    def _check_end(self, s: _Side, msg: End, mig: _Migration) -> None:
        ids = [e.nic_id for e in msg.nics]
        _need(ids == list(mig.digests), f"END lists nics {ids}; prepared {list(mig.digests)}")
        if s.role is not Role.SOURCE_AGENT:
            return  # a control-channel END reports frames this connection never carried
        for e in msg.nics:
            digest = mig.digests[e.nic_id]
            _need(
                e.frame_count == digest.count and e.digest == digest.digest(),
                f"END for nic {e.nic_id} claims {e.frame_count} frames, but {digest.count}"
                " went over this connection"
                + ("" if e.frame_count != digest.count else " with a different digest"),
                ErrorCode.INTEGRITY,
            )

    def _apply(self, s: _Side, o: _Side, msg: Message, records: memoryview | None = None) -> None:
        """Record that ``s`` sent ``msg``; ``records`` are a FRAMES' record bytes as encoded."""
        match msg:
            case Hello():
                s.hello = msg
                if o.hello is not None:
                    self._negotiate()
            case Error() | Bye():
                s.closed_by = msg.TYPE.name
            case Ping():
                s.pings.append(msg.t1_ns)
            case Pong():
                o.pings.popleft()
            case Counts():
                pass
            case Prepare():
                self._mig = _Migration(msg)
                self._recent.append(msg.migration_id)
                s.sent = {int(MsgType.PREPARE)}
                o.sent = set()
            case Frames():
                assert self._mig is not None and records is not None
                self._mig.digests[msg.nic_id].update_encoded(records, len(msg.frames))
                s.sent.add(_key(msg))
            case NicFilter():
                s.sent.update((_key(msg), _FILTER_BIT | msg.nic_id))
            case UsedIdx():
                s.sent.update((_key(msg), _PHASE_BIT | msg.phase))
            case _:
                s.sent.add(_key(msg))

    def _negotiate(self) -> None:
        ours, theirs = self._us.hello, self._them.hello
        assert ours is not None and theirs is not None
        self._version = (PROTOCOL_VERSION[0], min(ours.version[1], theirs.version[1]))
        # A feature of a later minor version than the negotiated one is an unknown bit to one
        # side, so it does not count even if that side set it.
        self._features = Feature(ours.features & theirs.features & _features_of(self._version[1]))
        self._peer_limits = Limits(
            max_message_bytes=theirs.max_message_bytes,
            max_frames_per_batch=theirs.max_frames_per_batch,
            max_frame_bytes=theirs.max_frame_bytes,
            max_vnet_hdr_bytes=theirs.max_vnet_hdr_bytes,
            max_buffer_bytes=theirs.max_message_bytes,
        )
