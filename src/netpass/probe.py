"""ICMP echo prober: a fixed-rate stream of pings whose losses the analysis counts.

Run inside the probing namespace:

    ip netns exec NS python -m netpass.probe --target IP --rate PPS --duration S --out FILE

Each echo carries a magic (fixed tag + per-run nonce) and a u64 sequence number in its payload,
so replies are matched to sends even after the 16-bit ICMP sequence wraps. Sending is paced on
an absolute schedule (t0 + seq/rate); between sends one loop drains replies from a non-blocking
raw socket. Arrival times come from kernel receive timestamps (SO_TIMESTAMPNS) when the kernel
provides them, so a reply read late by Python still gets its true arrival time.

Output: `ProbeData.to_dict()` as JSON, plus a "meta" object (pacing and socket facts that are
not part of ProbeData; `read_probe` ignores it, `read_probe_meta` returns it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from netpass.errors import HostError, NetpassError, UsageError
from netpass.results import ProbeData

# Linux values; the socket module does not export these names.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SOL_RAW = getattr(socket, "SOL_RAW", 255)
ICMP_FILTER = 1  # linux/icmp.h: bitmask of ICMP types the raw socket drops

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
MAGIC_TAG = b"NPRB"
HEADER = struct.Struct("!BBHHH")  # type, code, checksum, id, seq
TAG = struct.Struct("!4s4sQ")  # magic tag, run nonce, u64 sequence number
MIN_PAYLOAD = TAG.size
MAX_PAYLOAD = 65507 - HEADER.size  # largest ICMP payload in one IPv4 datagram
MIN_RATE, MAX_RATE = 1, 50_000
RCVBUF_BYTES = 32 * 1024 * 1024
SPIN_NS = 20_000  # spin only the last 20 µs: busy-waiting longer starves the VMs on small hosts
TIMESPEC = struct.Struct("@qq")  # struct timespec on 64-bit Linux


@dataclass
class ProbeConfig:
    target: str
    rate: int
    duration_s: float
    out: Path
    payload: int = 56
    grace_s: float = 1.0


@dataclass
class _State:
    send_ns: list[int] = field(default_factory=list)
    replies: list[tuple[int, int]] = field(default_factory=list)
    max_late_ns: int = 0
    late_sends: int = 0  # sends that went out more than SPIN_NS after their slot
    send_errors: int = 0
    kernel_ts: int = 0  # replies stamped by the kernel
    user_ts: int = 0  # replies stamped with time.time_ns() (no kernel timestamp)
    stop_reason: str = "duration"


def _csum_fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _word_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


class _Packets:
    """Builds echo requests; the checksum is updated incrementally since only seqs change."""

    def __init__(self, ident: int, nonce: bytes, payload: int) -> None:
        self.ident = ident
        self.nonce = nonce
        self.pad = bytes(i & 0xFF for i in range(payload - TAG.size))
        fixed = HEADER.pack(ICMP_ECHO_REQUEST, 0, 0, ident, 0) + TAG.pack(MAGIC_TAG, nonce, 0)
        self.base = _word_sum(fixed + self.pad)

    def build(self, seq: int) -> bytes:
        icmp_seq = seq & 0xFFFF
        total = self.base + icmp_seq
        total += (seq >> 48) + ((seq >> 32) & 0xFFFF) + ((seq >> 16) & 0xFFFF) + (seq & 0xFFFF)
        csum = ~_csum_fold(total) & 0xFFFF
        head = HEADER.pack(ICMP_ECHO_REQUEST, 0, csum, self.ident, icmp_seq)
        return head + TAG.pack(MAGIC_TAG, self.nonce, seq) + self.pad


def open_socket() -> tuple[socket.socket, bool]:
    """Raw ICMP socket, non-blocking, big receive buffer; returns (sock, kernel_timestamps)."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError as e:
        raise HostError("raw ICMP socket needs root (CAP_NET_RAW)") from e
    except OSError as e:
        raise HostError(f"cannot open raw ICMP socket: {e.strerror}") from e
    # FORCE ignores net.core.rmem_max (root only); a burst of late replies must not overflow.
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
    # Let only echo replies into the socket queue; unreachables etc. would just be parsed away.
    with contextlib.suppress(OSError):
        sock.setsockopt(
            SOL_RAW, ICMP_FILTER, struct.pack("I", ~(1 << ICMP_ECHO_REPLY) & 0xFFFFFFFF)
        )
    kernel_ts = True
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        kernel_ts = False
    sock.setblocking(False)
    return sock, kernel_ts


class Prober:
    def __init__(self, cfg: ProbeConfig, sock: socket.socket) -> None:
        self.cfg = cfg
        self.sock = sock
        self.ident = os.getpid() & 0xFFFF
        self.nonce = os.urandom(4)
        self.packets = _Packets(self.ident, self.nonce, cfg.payload)
        self.state = _State()
        self.stop_requested = 0  # count of SIGTERM/SIGINT received
        self.ancbuf = socket.CMSG_SPACE(TIMESPEC.size)
        self.bufsize = 60 + HEADER.size + cfg.payload  # IP header with options + ICMP

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested += 1

    def _recv_one(self) -> bool:
        """Read one datagram if there is one; returns False when the queue is empty."""
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(self.bufsize, self.ancbuf)
        except OSError:  # empty queue (EAGAIN), or a one-shot socket error such as EHOSTUNREACH
            return False
        t_ns = 0
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                sec, nsec = TIMESPEC.unpack_from(cdata)
                t_ns = sec * 1_000_000_000 + nsec
        if t_ns == 0:
            t_ns = time.time_ns()
            kernel = False
        else:
            kernel = True
        ihl = (data[0] & 0x0F) * 4 if data else 0
        if len(data) < ihl + HEADER.size + TAG.size:
            return True
        kind_, code, _csum, ident, _iseq = HEADER.unpack_from(data, ihl)
        if kind_ != ICMP_ECHO_REPLY or code != 0 or ident != self.ident:
            return True
        tag, nonce, seq = TAG.unpack_from(data, ihl + HEADER.size)
        if tag != MAGIC_TAG or nonce != self.nonce or seq >= len(self.state.send_ns):
            return True
        self.state.replies.append((seq, t_ns))
        if kernel:
            self.state.kernel_ts += 1
        else:
            self.state.user_ts += 1
        return True

    def _wait_until(self, due_pc: int) -> bool:
        """Receive replies until perf_counter reaches due_pc (spinning for the last SPIN_NS).

        Returns False if a stop signal came in meanwhile.
        """
        while not self.stop_requested:
            rem = due_pc - time.perf_counter_ns()
            if rem <= 0:
                return True
            if self._recv_one():
                continue
            if rem > SPIN_NS:
                select.select([self.sock], [], [], (rem - SPIN_NS) / 1e9)
        return False

    def _send(self, seq: int) -> None:
        pkt = self.packets.build(seq)
        self.state.send_ns.append(time.time_ns())
        try:
            self.sock.sendto(pkt, (self.cfg.target, 0))
        except OSError:
            # Counted as sent: an echo that could not leave is exactly a loss to measure.
            self.state.send_errors += 1

    def warm_up(self, timeout: float = 1.0) -> None:
        """One unmeasured echo first (another nonce: its reply is not counted), so the target's
        address is resolved before the stream: echoes that waited in the kernel for ARP left
        behind a later one, sent directly, and counted as reordered (7 at a probe's start)."""
        pkt = _Packets(self.ident, os.urandom(4), self.cfg.payload).build(0)
        with contextlib.suppress(OSError):
            self.sock.sendto(pkt, (self.cfg.target, 0))
        select.select([self.sock], [], [], timeout)

    def run(self) -> _State:
        cfg, st = self.cfg, self.state
        total = max(1, round(cfg.duration_s * cfg.rate))
        self.warm_up()
        while self._recv_one():  # drop anything queued before our first send
            pass
        # A gen-2 collection over a growing reply list would stall the schedule by milliseconds;
        # the probe creates no reference cycles, so collection can wait until the end.
        gc.collect()
        gc.disable()
        t0_pc = time.perf_counter_ns()
        print(f"PROBE-STARTED {time.time_ns()}", flush=True)
        for seq in range(total):
            due = t0_pc + seq * 1_000_000_000 // cfg.rate
            if not self._wait_until(due):
                st.stop_reason = "signal"
                break
            late = time.perf_counter_ns() - due
            if late > st.max_late_ns:
                st.max_late_ns = late
            if late > SPIN_NS:
                st.late_sends += 1
            self._send(seq)
        self._grace()
        gc.enable()
        return st

    def _grace(self) -> None:
        """Wait for late replies; a further signal cuts the wait short."""
        signals_at_stop = self.stop_requested
        end = time.perf_counter_ns() + int(self.cfg.grace_s * 1e9)
        while self.stop_requested == signals_at_stop:
            rem = end - time.perf_counter_ns()
            if rem <= 0:
                break
            if not self._recv_one():
                select.select([self.sock], [], [], min(rem / 1e9, 0.05))
        while self._recv_one():
            pass

    def result(self) -> dict[str, Any]:
        st = self.state
        data = ProbeData(
            target=self.cfg.target,
            rate_pps=self.cfg.rate,
            payload_bytes=self.cfg.payload,
            send_ns=st.send_ns,
            replies=st.replies,
        ).to_dict()
        span = st.send_ns[-1] - st.send_ns[0] if len(st.send_ns) > 1 else 0
        data["meta"] = {
            "ident": self.ident,
            "max_late_ns": st.max_late_ns,
            "late_sends": st.late_sends,
            "send_errors": st.send_errors,
            "achieved_pps": (len(st.send_ns) - 1) * 1e9 / span if span else None,
            "kernel_timestamps": st.kernel_ts,
            "user_timestamps": st.user_ts,
            "stop_reason": st.stop_reason,
        }
        return data


def _open_out(out: Path) -> tuple[int, Path]:
    """Create the temp file next to --out up front, so a bad path fails before probing."""
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror})") from e
    return fd, Path(tmp)


def _write_atomic(fd: int, tmp: Path, out: Path, obj: dict[str, Any]) -> None:
    os.fchmod(fd, 0o644)  # mkstemp makes it 0600; the probe runs as root, readers may not
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def read_probe(path: str | os.PathLike[str]) -> ProbeData:
    """Load a prober output file."""
    return ProbeData.from_dict(_load(path))


def read_probe_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The prober's own facts (max lateness, send errors, timestamp source); {} if absent."""
    meta = _load(path).get("meta", {})
    return dict(meta) if isinstance(meta, dict) else {}


def _load(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path) as f:
            obj = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read probe file {path}: {e.strerror}") from e
    except ValueError as e:
        raise UsageError(f"probe file {path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise UsageError(f"probe file {path}: expected a JSON object")
    return obj


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_args(argv: list[str] | None = None) -> ProbeConfig:
    p = _Parser(prog="netpass.probe", description="Fixed-rate ICMP echo prober.")
    p.add_argument("--target", required=True, help="IPv4 address to ping")
    p.add_argument("--rate", required=True, type=int, help="echoes per second (1..50000)")
    p.add_argument("--duration", required=True, type=float, help="seconds to send for")
    p.add_argument("--out", required=True, type=Path, help="JSON output file")
    p.add_argument("--payload", type=int, default=56, help="ICMP payload bytes (default 56)")
    p.add_argument("--grace", type=float, default=1.0, help="seconds to wait for late replies")
    a = p.parse_args(argv)
    try:
        target = str(ipaddress.IPv4Address(a.target))
    except ValueError:
        raise UsageError(f"--target {a.target!r} is not an IPv4 address") from None
    if not MIN_RATE <= a.rate <= MAX_RATE:
        raise UsageError(f"--rate {a.rate} out of range {MIN_RATE}..{MAX_RATE}")
    if not (a.duration > 0 and a.duration < 1e6):  # also rejects NaN
        raise UsageError(f"--duration {a.duration} must be > 0 seconds")
    if not MIN_PAYLOAD <= a.payload <= MAX_PAYLOAD:
        raise UsageError(f"--payload {a.payload} out of range {MIN_PAYLOAD}..{MAX_PAYLOAD}")
    if not (a.grace >= 0 and a.grace < 3600):
        raise UsageError(f"--grace {a.grace} must be >= 0 seconds")
    return ProbeConfig(target, a.rate, a.duration, a.out, a.payload, a.grace)


def main(argv: list[str] | None = None) -> int:
    tmp: Path | None = None
    try:
        cfg = parse_args(argv)
        fd, tmp = _open_out(cfg.out)
        sock, _ = open_socket()
        prober = Prober(cfg, sock)
        signal.signal(signal.SIGTERM, prober.on_signal)
        signal.signal(signal.SIGINT, prober.on_signal)
        prober.run()
        try:
            _write_atomic(fd, tmp, cfg.out, prober.result())
        except OSError as e:
            raise HostError(f"cannot write {cfg.out}: {e.strerror}") from e
        tmp = None
        return 0
    except NetpassError as e:
        print(f"netpass.probe: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


if __name__ == "__main__":
    sys.exit(main())
