"""A failed migration after the stop: SourceNic gives back exactly what the guest missed.

QEMU drops the 0-2 frames it read from the tap during its own stop (findings part E). When the
migration then fails and the source runs again, those must go back to the guest, ahead of the
ones still queued, and nothing it already took may come twice. Here the test process is the
hypervisor: it owns a real tap, takes frames from it as a guest would, drops one as the stop
does, and may keep one back as QEMU does after the stop; the capture, relay, drain and give-back
are netpass's own, on the real kernel data path.
"""

from __future__ import annotations

import os

import pytest

from netpass.datapath import tapfd, tc
from netpass.datapath.netns import iproute
from netpass.discovery import NicInfo, RxFilter
from netpass.switchover import SourceNic
from test_datapath import HDR_LEN, _plain_socket, frame, netns, parse, wait_until  # noqa: F401

TAP = "npdtapg"
MAC = "52:54:00:12:34:56"  # test_datapath.GUEST_MAC
BASE = 65530  # the RX used-idx at the baseline: the 16-bit counter wraps during the test


def _nic(fd: int, ns: str) -> SourceNic:
    info = NicInfo("nic0", MAC, TAP, "", [0], RxFilter(bytes.fromhex(MAC.replace(":", ""))), [fd])
    return SourceNic(info, os.getpid(), ns, 0)


@pytest.mark.parametrize(
    "held, final",
    [(False, True), (True, True), (False, False)],
    ids=["accounted", "accounted-one-held", "not-accounted"],
)
def test_give_back_after_the_stop_includes_what_the_stop_dropped(
    netns: str,  # noqa: F811
    held: bool,
    final: bool,
) -> None:
    """Relay S0..S9; the guest takes S0..S3, the stop drops S4, QEMU keeps S5 back (HELD) and
    hands it over once it runs again; P0..P4 arrive during the pause. FINAL: the orchestrator
    read the used-idx during the stop and sent it before RESUMED; else the give-back has only
    the used-idx read after the source resumed. The guest must end with every frame once, in
    order, except where QEMU's held frame overtakes the dropped one."""
    fd = tapfd.open_tap(TAP, hdr_len=HDR_LEN)
    nic = _nic(fd, netns)
    try:
        with iproute() as ipr:
            ipr.link("set", ifname=TAP, state="up")
        nic.prepare()
        nic.capture_on()
        assert nic.wait_tap_empty()
        nic.start_relay(BASE)
        with _plain_socket(TAP) as s:
            for i in range(10):
                s.send(frame(b"S", i))
            assert wait_until(lambda: nic.counters.relayed == 10, 2), nic.counters.to_dict()
            guest = [parse(f) for f in tapfd.drain(fd, HDR_LEN, max_frames=4)]
            dropped = tapfd.drain(fd, HDR_LEN, max_frames=1)  # purged by the stop
            kept = tapfd.drain(fd, HDR_LEN, max_frames=1) if held else []
            assert [parse(f) for f in dropped + kept] == [("S", 4), ("S", 5)][: 1 + held]
            nic.drain_at_stop()  # the source agent, on USED_IDX(STOPPED)
            assert nic.counters.drained == 5 - held
            for i in range(5):
                s.send(frame(b"P", i))  # left in the capture socket: the relay is paused
        # The source runs again: QEMU hands over the frame it kept; the tap queue is empty.
        guest += [parse(f) for f in kept]
        assert not tapfd.queued(fd)
        if final:
            nic.account((BASE + 4) & 0xFFFF)  # USED_IDX(FINAL), read during the stop
            nic.drain_tap()  # the agent drains at FINAL too: nothing is left
        nic.give_back((BASE + 4 + held) & 0xFFFF)  # USED_IDX(RESUMED)
        nic.give_back(None)  # ABORT, which follows: nothing is handed back twice
        guest += [parse(f) for f in tapfd.drain(fd, HDR_LEN)]
        assert tc.egress_filter_prios(TAP) == set()  # the redirect is gone
    finally:
        nic.close()
        os.close(fd)
    everything = [("S", i) for i in range(10)] + [("P", i) for i in range(5)]
    if held:  # S5 reached the guest before the give-back could return S4
        everything[4:6] = [("S", 5), ("S", 4)]
    assert guest == everything
    assert nic.counters.returned == 11 - held
