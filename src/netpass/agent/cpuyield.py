"""While its migrations are paused, an agent does its deferrable work on spare CPU only.

During the pause the destination QEMU loads the last RAM and device state on one thread, and
that thread's CPU time *is* the pause. An agent's work then (accounting, draining, streaming and
early injection of the owed frames) only has to be done by the time the destination runs; at
normal priority a waking agent thread can preempt the QEMU threads of a host without spare
cores. So while every migration the agent serves is paused, all its threads run at SCHED_IDLE.
What it gained in the two-host lab: docs/agent.md, "CPU during the pause".

What does need the agent at once arrives as a message: the destination started, the migration
failed, the source's final count. A guard thread at normal priority watches the channels the
paused migrations named, and ends the yield as soon as one has received anything, so the
message is handled at normal priority. It checks readability and also the socket's count of
received bytes (TCP_INFO), every `CHECK_S`: the agent's own thread may have read the bytes in
a moment of spare CPU and then been starved before handling them. The yield also ends after
`LIMIT_S`, as SCHED_IDLE threads can starve on a saturated host. A migration that still has
deferrable work after such a message says `paused()` again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Hashable, Iterable
from typing import Final

log = logging.getLogger("netpass.agent")

LIMIT_S: Final = 0.25  # over the lab's longest pause (~120 ms); bounds a starved agent
CHECK_S: Final = 0.002  # how often the guard looks at the received byte counts
_TCP_INFO_BYTES_RECEIVED = slice(128, 136)  # struct tcp_info: u64 tcpi_bytes_received (4.1+)


def _bytes_received(sock: socket.socket) -> int | None:
    """The kernel's count of bytes received on SOCK, or None if it has none (not TCP, closed)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    raw = info[_TCP_INFO_BYTES_RECEIVED]
    return int.from_bytes(raw, sys.byteorder) if len(raw) == 8 else None


def _set_policy(policy: int, skip: int | None) -> None:
    """POLICY on every thread of this process but SKIP (threads created later inherit it
    from their creator)."""
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        if tid != skip:
            # The thread may have ended meanwhile; without root it may not be raised back.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.sched_setscheduler(tid, policy, os.sched_param(0))


class _Guard(threading.Thread):
    """Ends the yield when a watched fd turns readable, at the time limit, or when cancelled."""

    def __init__(self, owner: CpuYield, fds: set[int]) -> None:
        super().__init__(name="netpass-cpu-guard", daemon=True)
        self.owner, self.fds = owner, fds
        self._cancel_r, self._cancel_w = os.pipe()

    def cancel(self) -> None:
        """Under the owner's lock, while this is its guard (so at most once)."""
        with contextlib.suppress(BrokenPipeError):  # it stopped polling just now
            os.write(self._cancel_w, b"x")
        os.close(self._cancel_w)

    def run(self) -> None:
        p = select.poll()
        p.register(self._cancel_r, select.POLLIN)
        for fd in self.fds:
            p.register(fd, select.POLLIN)  # also reports ERR/HUP: a closed channel wakes too
        # Not owning: the fds stay the channels' (detached below, never closed here).
        socks = [socket.socket(fileno=fd) for fd in self.fds]
        try:
            woken = self._watch(p, socks)
        finally:
            for sock in socks:
                sock.detach()
            os.close(self._cancel_r)
        if woken is not None:
            self.owner._guard_ended(self, woken)

    def _watch(self, p: select.poll, socks: list[socket.socket]) -> bool | None:
        """True: something arrived; False: the time limit; None: cancelled."""
        base = [_bytes_received(s) for s in socks]
        deadline = time.monotonic() + self.owner.limit_s
        while (left := deadline - time.monotonic()) > 0:
            events = p.poll(min(left, CHECK_S) * 1000)
            if any(fd == self._cancel_r for fd, _ in events):
                return None
            if events or [_bytes_received(s) for s in socks] != base:
                return True
        return False


class CpuYield:
    """Tracks which migrations are live and which are paused; yields while all live ones are."""

    def __init__(self, enabled: bool = True, limit_s: float = LIMIT_S) -> None:
        self.enabled = enabled and hasattr(os, "SCHED_IDLE")
        self.limit_s = limit_s
        self.yields = 0  # how often the agent went to SCHED_IDLE
        self.woken = 0  # yields ended by a message
        self.expired = 0  # yields ended by the time limit
        self._live: set[Hashable] = set()
        self._paused: dict[Hashable, set[int]] = {}  # key -> fds whose messages are urgent
        self._lock = threading.Lock()
        self._guard: _Guard | None = None
        self._since = 0  # monotonic ns the current yield began
        self._total_ns = 0  # time spent in ended yields

    @property
    def yielding(self) -> bool:
        return self._guard is not None

    def yielded_ns(self) -> int:
        """Time this agent has spent yielding so far."""
        with self._lock:
            ongoing = time.monotonic_ns() - self._since if self._guard is not None else 0
            return self._total_ns + ongoing

    def live(self, key: Hashable) -> None:
        """A migration this agent serves (from capture-on on)."""
        with self._lock:
            self._live.add(key)
            self._apply()

    def paused(self, key: Hashable, wake: Iterable[int | None] = ()) -> None:
        """KEY's VM is stopped and its work can wait for spare CPU, until one of the WAKE fds
        has something to read."""
        with self._lock:
            if key in self._live:
                self._paused[key] = {fd for fd in wake if fd is not None}
            self._apply()

    def running(self, key: Hashable) -> None:
        """KEY's destination runs, or it failed: its work is urgent again."""
        with self._lock:
            self._paused.pop(key, None)
            self._apply()

    def done(self, key: Hashable) -> None:
        with self._lock:
            self._live.discard(key)
            self._paused.pop(key, None)
            self._apply()

    def _apply(self) -> None:
        want = self.enabled and bool(self._live) and self._paused.keys() >= self._live
        if want and self._guard is None:
            guard = _Guard(self, set().union(*self._paused.values()))
            guard.start()  # created at normal priority, and left there
            self._guard = guard
            self.yields += 1
            self._since = time.monotonic_ns()
            _set_policy(os.SCHED_IDLE, guard.native_id)
        elif not want and self._guard is not None:
            self._guard.cancel()
            self._end()

    def _end(self) -> None:
        self._guard = None
        self._total_ns += time.monotonic_ns() - self._since
        _set_policy(os.SCHED_OTHER, None)

    def _guard_ended(self, guard: _Guard, woken: bool) -> None:
        with self._lock:
            if self._guard is not guard:
                return  # cancelled meanwhile
            os.close(guard._cancel_w)  # no cancel() can come any more
            if woken:
                self.woken += 1
            else:
                self.expired += 1
                log.info("CPU yield ended after %.0f ms", self.limit_s * 1e3)
            self._paused.clear()  # normal priority until a migration says paused() again
            self._end()
