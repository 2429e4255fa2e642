"""The destination half's intake rules, without QEMU: budget, MAC check, filter mapping."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from typing import Any
from uuid import uuid4

import pytest
from prometheus_client import CollectorRegistry

from conftest import needs_root
from netpass import wire
from netpass.agent.host import (
    DestSession,
    HostAgent,
    SessionError,
    _end_listening,
    _Nic,
    _nic_info,
    _rx_filter,
    find_tap_owner,
)
from netpass.errors import DatapathError

MAC = bytes.fromhex("525400aabb01")


def _session(budget: int) -> tuple[HostAgent, DestSession]:
    registry = CollectorRegistry()
    host = HostAgent("test", ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), registry, budget)
    spec = wire.NicSpec(0, "tapx", MAC)
    nic = _Nic(spec, 1, _nic_info(spec, [3]))
    return host, DestSession(uuid4(), "vm", [nic], host)


def _frames(mid: object, n: int, size: int = 1000, dst: bytes = MAC) -> wire.Frames:
    recs = tuple(
        wire.FrameRecord(dst + bytes(6) + b"\x08\x00" + bytes(size - 14)) for _ in range(n)
    )
    return wire.Frames(mid, 0, 0, recs)  # type: ignore[arg-type]


def test_budget_drops_the_newest_and_counts_them() -> None:
    host, s = _session(budget=10_000)
    s.on_frames(_frames(s.mid, 25))
    assert len(s.inbox[0].frames) == 10 and s.buffered_bytes == 10_000
    assert s.dropped_over_budget == 15
    value = host.metrics.dropped.labels("over the frame budget")._value.get()
    assert value == 15


def test_frames_for_another_mac_are_refused_whole() -> None:
    _, s = _session(budget=1 << 20)
    batch = _frames(s.mid, 3)
    bad = wire.FrameRecord(bytes.fromhex("525400999999") + bytes(6) + b"\x08\x00" + bytes(50))
    mixed = wire.Frames(s.mid, 0, 0, (*batch.frames, bad))
    with pytest.raises(SessionError, match="nothing of this batch is injected"):
        s.on_frames(mixed)
    assert len(s.inbox[0].frames) == 0  # not even the good ones before it
    # Broadcast and multicast are owed too (the guest takes them).
    s.on_frames(_frames(s.mid, 1, dst=b"\xff" * 6))
    s.on_frames(_frames(s.mid, 1, dst=bytes.fromhex("01005e000001")))
    assert len(s.inbox[0].frames) == 2


def test_runt_frames_are_refused() -> None:
    _, s = _session(budget=1 << 20)
    with pytest.raises(SessionError):
        s.on_frames(wire.Frames(s.mid, 0, 0, (wire.FrameRecord(MAC + b"\x00"),)))


def test_nic_filter_maps_to_the_guest_rx_filter() -> None:
    mcast = bytes.fromhex("01005e000001")
    f = wire.NicFilter(uuid4(), 0, wire.NicFilterFlag.ALL_UNICAST, multicast=(mcast,), unicast=())
    rx = _rx_filter(MAC, f)
    assert rx.unicast_all and not rx.promiscuous and not rx.multicast_all
    assert rx.accepts(mcast + bytes(8)) and not rx.accepts(bytes.fromhex("01005e000002") + bytes(8))
    assert rx.accepts(bytes.fromhex("525400000099") + bytes(8))  # all unicast


_HOLD_TAP = """
import fcntl, struct, sys, time
fd = open("/dev/net/tun", "r+b", buffering=0)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[1].encode(), 0x0002 | 0x1000))
print("ready", flush=True)
time.sleep(60)
"""


@needs_root
def test_tap_owner_is_the_one_in_the_agents_namespace() -> None:
    """Tap names repeat across namespaces (a leftover QEMU keeps its deleted namespace alive):
    the agent takes the holder in its own namespace, and refuses to guess otherwise."""
    tap, nss, procs = "npq9dup", ["npq9dupa", "npq9dupb"], []

    def hold(netns: str | None) -> subprocess.Popen[str]:
        pre = ["ip", "netns", "exec", netns] if netns else []
        cmd = [*pre, sys.executable, "-c", _HOLD_TAP, tap]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    try:
        for ns in nss:
            subprocess.run(["ip", "netns", "add", ns], check=True)
            hold(ns)
        with pytest.raises(DatapathError, match="several processes"):
            find_tap_owner(tap)
        mine = hold(None)
        pid, fds = find_tap_owner(tap)
        assert pid == mine.pid and len(fds) == 1
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for ns in nss:
            subprocess.run(["ip", "netns", "del", ns], check=False)


class _Control:
    """The orchestrator's side of a control channel, scripted: RECV hands out EVENTS in turn."""

    def __init__(self, events: list[wire.Event]) -> None:
        self.events = asyncio.Queue[wire.Event]()
        for ev in events:
            self.events.put_nowait(ev)
        self.sent: list[wire.Message] = []

    async def recv(self) -> wire.Event:
        return await self.events.get()

    async def send(self, msg: wire.Message) -> None:
        self.sent.append(msg)


def test_work_called_off_by_resumed_then_abort_ends_as_aborted() -> None:
    """After the stop the source agent streams while it reads the control channel; USED_IDX
    (RESUMED) calls the stream off and gives the frames back, and the ABORT behind it must
    still be read and answered (the cancelled stream once ended the session with
    CancelledError: no ACK(ABORT), the migration counted as failed)."""
    mid = uuid4()
    ch = _Control([wire.UsedIdx(mid, wire.UsedPhase.RESUMED, ((0, 7),)), wire.Abort(mid, "x")])
    seen: list[str] = []

    async def stream() -> tuple[wire.NicSummary, ...]:
        await asyncio.sleep(3600)
        return ()

    async def on_event(work: asyncio.Task[Any], ev: object) -> str | None:
        if isinstance(ev, wire.UsedIdx):
            work.cancel()
            await asyncio.sleep(0)  # the give-back
            seen.append("resumed")
            return None
        if isinstance(ev, wire.Abort):
            await ch.send(wire.Ack(mid, wire.MsgType.ABORT))
            return "aborted"
        return None

    outcome = asyncio.run(
        asyncio.wait_for(_end_listening(ch, mid, stream(), lambda: (), on_event), 5)  # type: ignore[arg-type]
    )
    assert outcome == "aborted" and seen == ["resumed"]
    assert [type(m).__name__ for m in ch.sent] == ["Ack"]
