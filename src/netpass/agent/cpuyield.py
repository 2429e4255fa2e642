"""While its migrations are paused, an agent does its deferrable work on spare CPU only.

During the pause the destination QEMU loads the last RAM and device state on one thread, and
that thread's CPU time *is* the pause. An agent's work then (accounting, draining, streaming and
early injection of the owed frames) only has to be done by the time the destination runs; at
normal priority a waking agent thread can preempt the QEMU threads of a host without spare
cores. So while every migration the agent serves is paused, all its threads run at SCHED_IDLE.
What it gained in the two-host lab: docs/agent.md, "CPU during the pause".

What does need the agent at once arrives as a message: the destination started, the migration
failed, the source's final count. A guard thread at normal priority polls the channels the
paused migrations named and ends the yield as soon as one is readable, so the message is
handled at normal priority; the yield also ends after `LIMIT_S`, as SCHED_IDLE threads can
starve on a saturated host. A migration that still has deferrable work after such a message
says `paused()` again. The guard is a Python thread: to act it needs the GIL, which a starved
SCHED_IDLE thread of the agent may hold. So only yield where the host has spare CPU again by
the time the agent is needed (see host.py: the source agent, in precopy).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Hashable, Iterable
from typing import Final

log = logging.getLogger("netpass.agent")

LIMIT_S: Final = 0.25  # over the lab's longest pause (~120 ms); bounds a starved agent


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
        try:
            events = p.poll(self.owner.limit_s * 1000)
        finally:
            os.close(self._cancel_r)
        if not any(fd == self._cancel_r for fd, _ in events):
            self.owner._guard_ended(self, woken=bool(events))


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
