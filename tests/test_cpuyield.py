"""The agent's CPU yield: real scheduling policies of this process's threads."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from netpass.agent.cpuyield import CpuYield


def _policies() -> dict[int, int]:
    out = {}
    for t in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a cancelled guard thread ending
            out[int(t)] = os.sched_getscheduler(int(t))
    return out


@pytest.fixture
def cpu() -> Iterator[CpuYield]:
    c = CpuYield(limit_s=5.0)
    try:
        yield c
    finally:
        for key in list(c._live):
            c.done(key)
        assert set(_policies().values()) == {os.SCHED_OTHER}


@pytest.fixture
def helper() -> Iterator[int]:
    """A second thread of this process, alive for the test."""
    stop, ready = threading.Event(), threading.Event()
    tid: list[int] = []

    def run() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        stop.wait()

    t = threading.Thread(target=run)
    t.start()
    ready.wait()
    yield tid[0]
    stop.set()
    t.join()


def test_yields_every_thread_while_the_only_migration_is_paused(cpu: CpuYield, helper: int) -> None:
    me = threading.get_native_id()
    cpu.live("m1")
    assert not cpu.yielding and os.sched_getscheduler(me) == os.SCHED_OTHER
    cpu.paused("m1")
    assert cpu.yielding
    pol = _policies()
    assert pol[me] == pol[helper] == os.SCHED_IDLE
    assert cpu._guard is not None and pol[cpu._guard.native_id or 0] == os.SCHED_OTHER
    cpu.running("m1")
    assert not cpu.yielding
    assert set(_policies().values()) == {os.SCHED_OTHER}
    assert cpu.yields == 1


def test_a_thread_started_while_yielding_is_restored_too(cpu: CpuYield) -> None:
    cpu.live("m1")
    cpu.paused("m1")
    seen: list[int] = []
    stop = threading.Event()

    def run() -> None:
        seen.append(os.sched_getscheduler(0))
        stop.wait()

    t = threading.Thread(target=run)
    t.start()
    while not seen:
        time.sleep(0.001)
    assert seen == [os.SCHED_IDLE]  # inherited from this (yielding) thread
    cpu.running("m1")
    assert t.native_id is not None and os.sched_getscheduler(t.native_id) == os.SCHED_OTHER
    stop.set()
    t.join()


def test_no_yield_while_another_migration_is_urgent(cpu: CpuYield) -> None:
    cpu.live("a")
    cpu.live("b")  # say, relaying to a running guest
    cpu.paused("a")
    assert not cpu.yielding
    cpu.paused("b")
    assert cpu.yielding
    cpu.running("b")  # b's destination started: deliver now
    assert not cpu.yielding
    cpu.done("b")
    assert cpu.yielding  # a, the only one left, is still paused
    cpu.done("a")
    assert not cpu.yielding


def test_paused_before_live_or_unknown_does_not_yield(cpu: CpuYield) -> None:
    cpu.paused("ghost")
    assert not cpu.yielding
    cpu.live("m1")
    assert not cpu.yielding


def test_the_guard_ends_a_yield_that_lasts_too_long(helper: int) -> None:
    cpu = CpuYield(limit_s=0.05)
    try:
        cpu.live("m1")
        cpu.paused("m1")
        assert os.sched_getscheduler(helper) == os.SCHED_IDLE
        deadline = time.monotonic() + 2
        while cpu.yielding and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not cpu.yielding and cpu.expired == 1
        assert set(_policies().values()) == {os.SCHED_OTHER}
        cpu.running("m1")  # late: changes nothing
        assert cpu.expired == 1 and not cpu.yielding
        cpu.paused("m1")  # a next pause yields again
        assert cpu.yielding
    finally:
        cpu.done("m1")
    assert set(_policies().values()) == {os.SCHED_OTHER}


def test_disabled_never_yields() -> None:
    cpu = CpuYield(enabled=False)
    cpu.live("m1")
    cpu.paused("m1")
    assert not cpu.yielding
    assert set(_policies().values()) == {os.SCHED_OTHER}


def test_a_message_on_a_watched_channel_ends_the_yield_at_once(helper: int) -> None:
    cpu = CpuYield(limit_s=5.0)
    a, b = socket.socketpair()
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        cpu.live("m1")
        cpu.paused("m1", [a.fileno(), None])
        assert cpu.yielding and os.sched_getscheduler(helper) == os.SCHED_IDLE
        b.send(b"VM_STARTED")  # the peer says something: handle it at normal priority
        deadline = time.monotonic() + 1
        while cpu.yielding and time.monotonic() < deadline:
            time.sleep(0.001)
        assert not cpu.yielding and cpu.woken == 1 and cpu.expired == 0
        assert os.sched_getscheduler(helper) == os.SCHED_OTHER
        assert a.recv(100) == b"VM_STARTED"  # the guard only looked
        cpu.paused("m1", [a.fileno()])  # more deferrable work after that message
        assert cpu.yielding and cpu.yields == 2
        cpu.running("m1")  # cancelled, not woken
        assert not cpu.yielding and cpu.woken == 1
    finally:
        cpu.done("m1")
        a.close()
        b.close()
    time.sleep(0.05)  # the cancelled guard closes its pipe as it exits
    assert len(os.listdir("/proc/self/fd")) == fds_before - 2
