"""Put frames straight into a tap's queue, past its clsact egress filters and root qdisc.

An AF_PACKET socket with PACKET_QDISC_BYPASS hands each frame to the tap driver directly, so
injected frames reach the guest even while the tap's egress is redirected or its hold is
closed, and ahead of everything the hold keeps. When the tap queue is full the driver refuses
exactly that frame (ENOBUFS) and nothing is queued, so sending it again is safe.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterable
from types import TracebackType

from netpass.datapath.netns import check_ifname, in_netns
from netpass.errors import DatapathError

SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20
SO_SNDBUFFORCE = 32
_RETRY_SLEEP = 0.0001
_PACE_WINDOW_NS = 1_000_000
_FULL = (errno.ENOBUFS, errno.EAGAIN)


class Injector:
    """Send frames into IFNAME, retrying while its queue is full.

    PACE_PER_MS caps the rate at that many frames per millisecond (a TCG guest dropped frames
    from unpaced bursts); bursts never exceed one millisecond's worth. RETRY_FOR bounds how
    long one frame may wait for room in the queue before DatapathError.

    A frame counts against the socket's send buffer until the device frees it. Taps release
    it on queueing, but a veth/bridge path keeps it charged while a qdisc holds it: there a
    full SNDBUF (bytes; root may exceed the sysctl limit) shows up as a full queue.
    """

    def __init__(
        self,
        ifname: str,
        *,
        pace_per_ms: float | None = None,
        retry_for: float = 1.0,
        sndbuf: int | None = None,
        netns: str | None = None,
    ) -> None:
        check_ifname(ifname)
        if pace_per_ms is not None and not pace_per_ms > 0:
            raise DatapathError(f"pace must be a positive number of frames/ms, not {pace_per_ms}")
        self.ifname = ifname
        self.retry_for = retry_for
        self.sent = 0
        self.retries = 0  # ENOBUFS answers, i.e. times the queue was full
        self._interval_ns = round(1_000_000 / pace_per_ms) if pace_per_ms else 0
        self._next_ns = 0
        with in_netns(netns):
            # Protocol 0: a send-only socket, the kernel queues nothing for it to read.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            if sndbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
            sock.bind((ifname, 0))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise DatapathError(f"cannot open injection socket on {ifname}: {e.strerror}") from e
        self._sock = sock

    def set_pace(self, pace_per_ms: float | None) -> None:
        """Change the cap on frames per millisecond (None: unpaced)."""
        if pace_per_ms is not None and not pace_per_ms > 0:
            raise DatapathError(f"pace must be a positive number of frames/ms, not {pace_per_ms}")
        self._interval_ns = round(1_000_000 / pace_per_ms) if pace_per_ms else 0
        self._next_ns = 0

    def send(self, frame: bytes) -> None:
        """Queue FRAME on the tap (paced if asked), waiting up to `retry_for` for room."""
        if self._interval_ns:
            self._pace()
        deadline = 0.0
        while True:
            try:
                self._sock.send(frame)
                break
            except OSError as e:
                if e.errno not in _FULL:
                    raise DatapathError(f"injection into {self.ifname} failed: {e.strerror}") from e
            self.retries += 1
            now = time.monotonic()
            if not deadline:
                deadline = now + self.retry_for
            elif now >= deadline:
                raise DatapathError(
                    f"tap {self.ifname} queue stayed full for {self.retry_for:g} s; "
                    f"frame {self.sent + 1} not delivered"
                )
            time.sleep(_RETRY_SLEEP)
        self.sent += 1

    def send_many(self, frames: Iterable[bytes]) -> int:
        """Send FRAMES in order; returns how many were sent."""
        n = 0
        for f in frames:
            self.send(f)
            n += 1
        return n

    def _pace(self) -> None:
        # Absolute schedule, so sleep overshoots are caught up and the average rate holds;
        # catching up never sends more than one millisecond's worth back to back.
        now = time.monotonic_ns()
        if not self._next_ns:
            self._next_ns = now
        slot = max(self._next_ns, now - _PACE_WINDOW_NS)
        if slot > now:
            time.sleep((slot - now) / 1e9)
        self._next_ns = slot + self._interval_ns

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Injector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
