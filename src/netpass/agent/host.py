"""The per-host agent: this host's half of every netpass switchover (docs/agent.md, "Two hosts").

The orchestrator keeps QMP and the timeline; over the control channel it tells the agent what
QMP said (`USED_IDX`, `HOLD`, `VM_STARTED`). On the source host the agent runs `SourceNic`
(capture, relay, accounting) and streams the owed frames straight to the destination host's
agent over the frame channel; there the agent runs `DestNic` (hold, bypass injection).

Which half a migration is on this host follows from the orchestrator's messages: a `PEER`
(where the destination agent listens) before `CAPTURE_ON` makes it the source.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final
from uuid import UUID

from prometheus_client import CollectorRegistry, Counter

from netpass import wire
from netpass.agent.channel import Channel, ChannelError, connect
from netpass.datapath import tapfd
from netpass.discovery import NicInfo, RxFilter
from netpass.errors import DatapathError, HostError, NetpassError
from netpass.switchover import (
    BROADCAST_OR_MULTICAST,
    QUIET_S,
    RESCUE_DEADLINE_S,
    DestNic,
    SourceNic,
    catchup_for,
)

log = logging.getLogger("netpass.agent")

DEFAULT_FRAME_BUDGET: Final = 256 << 20  # bytes of rescued frames one migration may buffer
STREAM_BATCH: Final = 256
BACKLOG_BURST_S: Final = 0.003  # FRAMES within this of the first are the stop's backlog
END_ACK_TIMEOUT_S: Final = 10.0  # the source stops waiting for the destination's ACK(END)
PRESTART_POLL_S: Final = 0.005  # how often the stream looks for owed frames before VM start
SOURCE_END_TIMEOUT_S: Final = 30.0  # the destination stops waiting for the source's END


class HostMetrics:
    """What the switchover did on this host, for Prometheus."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.captured = Counter(
            "netpass_frames_captured", "Frames the source capture took", registry=registry
        )
        self.injected = Counter(
            "netpass_frames_injected", "Rescued frames injected at the destination",
            registry=registry,
        )  # fmt: skip
        self.dropped = Counter(
            "netpass_frames_dropped", "Frames dropped, by reason", ["reason"], registry=registry
        )
        self.migrations = Counter(
            "netpass_migrations", "Migrations by side and outcome", ["side", "outcome"],
            registry=registry,
        )  # fmt: skip


def find_tap_owner(tap: str) -> tuple[int, list[int]]:
    """(pid, tap fds) of the process (the hypervisor) that has TAP open.

    Tap names are unique only within a network namespace: when processes in several
    namespaces hold a TAP, the one in this agent's namespace is it; otherwise it is ambiguous.
    """
    found: list[tuple[int, list[int]]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fds = tapfd.find_tap_fds(int(name), tap)
        except (DatapathError, HostError, OSError):
            continue  # gone meanwhile, or a kernel thread
        if fds:
            found.append((int(name), fds))
    if len(found) > 1:
        own = _netns_ino("self")
        ours = [c for c in found if _netns_ino(c[0]) == own]
        if len(ours) != 1:
            pids = ", ".join(str(pid) for pid, _ in found)
            raise DatapathError(f"tap {tap} is open in several processes ({pids}): ambiguous")
        found = ours
    if not found:
        raise DatapathError(f"no process has tap {tap} open")
    return found[0]


def _netns_ino(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _nic_info(spec: wire.NicSpec, fds: list[int]) -> NicInfo:
    if len(fds) != 1:
        raise DatapathError(f"tap {spec.tap} has {len(fds)} queues; netpass needs one")
    return NicInfo(
        nic_id=str(spec.nic_id),
        mac=_mac_text(spec.mac),
        tap=spec.tap,
        virtio_path="",
        rx_queues=[0],
        rx_filter=RxFilter(mac=spec.mac),
        tap_fds=fds,
    )


def _rx_filter(mac: bytes, f: wire.NicFilter) -> RxFilter:
    return RxFilter(
        mac=mac,
        promiscuous=bool(f.flags & wire.NicFilterFlag.PROMISCUOUS),
        multicast_all=bool(f.flags & wire.NicFilterFlag.ALL_MULTICAST),
        multicast=set(f.multicast),
        unicast_all=bool(f.flags & wire.NicFilterFlag.ALL_UNICAST),
        unicast=set(f.unicast),
    )


@dataclass
class _Nic:
    spec: wire.NicSpec
    pid: int
    info: NicInfo
    # The QEMU's network namespace, held open: when that QEMU dies (a destination killed
    # mid-migration) netpass can still open its hold and remove its filters on a tap that
    # outlives it, instead of failing on a /proc/PID path that is gone.
    ns_fd: int = -1

    @property
    def netns(self) -> str:
        return (
            f"/proc/{os.getpid()}/fd/{self.ns_fd}"
            if self.ns_fd >= 0
            else f"/proc/{self.pid}/ns/net"
        )

    def close(self) -> None:
        if self.ns_fd >= 0:
            os.close(self.ns_fd)
            self.ns_fd = -1


class SessionError(NetpassError):
    """This host cannot do its half of the migration; the orchestrator gets the reason."""


# --- source host ---------------------------------------------------------------------------
class SourceSession:
    """Capture + relay + accounting for one migration; streams the owed frames to the peer."""

    def __init__(self, mid: UUID, vm: str, nics: list[_Nic], host: HostAgent) -> None:
        self.mid, self.vm, self.host = mid, vm, host
        self.nics = {n.spec.nic_id: n for n in nics}
        self.halves: dict[int, SourceNic] = {}
        self.peer: wire.Peer | None = None
        self.frames: Channel | None = None
        self._streamer: asyncio.Task[None] | None = None
        self._peer_started = asyncio.Event()
        self._end_acked = asyncio.Event()
        self.done = False  # the owed frames reached the destination agent
        self.given_back = False
        self._sent = {nic_id: wire.FrameDigest() for nic_id in self.nics}

    def set_filter(self, f: wire.NicFilter) -> None:
        n = self.nics[f.nic_id]
        n.info.rx_filter = _rx_filter(n.spec.mac, f)

    async def capture_on(self) -> None:
        for slot, (nic_id, n) in enumerate(sorted(self.nics.items())):
            half = SourceNic(n.info, n.pid, n.netns, slot)
            self.halves[nic_id] = half
            await asyncio.to_thread(half.prepare)
            await asyncio.to_thread(half.capture_on)
            if not await asyncio.to_thread(half.wait_tap_empty):
                raise SessionError(f"source tap {n.spec.tap} did not empty")
        await self._open_frame_channel()

    async def _open_frame_channel(self) -> None:
        assert self.peer is not None
        p = self.peer
        ch = await connect(
            p.host,
            p.port,
            self.host.client_ctx,
            wire.Role.SOURCE_AGENT,
            self.host.identity,
            server_hostname=p.server_name or None,
        )
        self.frames = ch
        specs = tuple(n.spec for n in self.nics.values())
        await ch.send(wire.Prepare(self.mid, self.vm, specs))
        await ch.expect(wire.Prepared)
        await ch.send(wire.CaptureOn(self.mid))
        await ch.expect(wire.Ack)

    def used_idx(self, phase: wire.UsedPhase, entries: tuple[tuple[int, int], ...]) -> None:
        for nic_id, u in entries:
            half = self.halves[nic_id]
            if phase == wire.UsedPhase.BASELINE:
                half.start_relay(u)
            elif phase == wire.UsedPhase.OBSERVE:
                half.observe_used(u)
        if phase == wire.UsedPhase.STOPPED:
            for half in self.halves.values():
                half.drain_at_stop()  # reads that never block, of a few frames

    def flood_point(self) -> None:
        """From now on floods captured here also reach the destination's hold: neither relay
        nor owe them."""
        for half in self.halves.values():
            half.set_flush_point()

    async def final(self, entries: tuple[tuple[int, int], ...]) -> None:
        """The used-idx at the stop: account, drain, and start streaming what is owed."""
        for nic_id, u in entries:
            half = self.halves[nic_id]
            half.account(u)
            half.drain_tap()  # reads that never block, of a few frames: no worker thread
        self.flood_point()  # unless HOLD (postcopy) set it before the stop
        self._streamer = asyncio.create_task(self._stream())

    async def _stream(self) -> None:
        """Owed frames to the destination agent until the source has been quiet for QUIET_S
        after the destination started (RESCUE_DEADLINE_S at most), then END."""
        assert self.frames is not None
        ch = self.frames
        listener = asyncio.create_task(self._listen())
        started = asyncio.create_task(self._peer_started.wait())
        deadline: float | None = None
        try:
            while True:
                moved = 0
                for nic_id, half in self.halves.items():
                    records = [wire.FrameRecord(f) for f in half.take(STREAM_BATCH)]
                    if records:
                        for msg in ch.conn.batch_frames(nic_id, records):
                            await ch.send(msg)
                        self._sent[nic_id].update_many(records)
                        moved += len(records)
                if moved:
                    continue
                if listener.done():  # the destination agent went away: say why, now
                    listener.result()
                    raise SessionError("frame channel ended before END")
                if self._peer_started.is_set():
                    deadline = deadline or time.monotonic() + RESCUE_DEADLINE_S
                    quiet = all(h.quiet_for() >= QUIET_S for h in self.halves.values())
                    if quiet or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.001)
                else:
                    # Until the destination runs, the frames only need to be there by then:
                    # look less often (the pause is when both QEMUs need the CPU), but wake
                    # at once when it starts. (One waiter for all rounds: wait_for would
                    # make a task each time.)
                    await asyncio.wait({started}, timeout=PRESTART_POLL_S)
            await ch.send(wire.End(self.mid, ch.conn.frame_summaries()))
            await asyncio.wait({listener}, timeout=END_ACK_TIMEOUT_S)
            if not self._end_acked.is_set():
                if listener.done():
                    listener.result()
                raise SessionError(
                    f"destination agent did not acknowledge END within {END_ACK_TIMEOUT_S:g} s"
                )
            self.done = True
        finally:
            started.cancel()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self) -> None:
        assert self.frames is not None
        while True:
            ev = await self.frames.recv()
            if isinstance(ev, wire.VmStarted):
                for half in self.halves.values():
                    half.dest_running()
                self._peer_started.set()
            elif isinstance(ev, wire.Ack) and ev.acked == wire.MsgType.END:
                self._end_acked.set()
                return
            elif isinstance(ev, wire.GiveBack):
                raise SessionError(f"destination agent gave the frames back: {ev.reason}")
            elif isinstance(ev, wire.Error | wire.ConnectionClosed):
                raise SessionError(f"frame channel closed: {ev}")

    async def finish(self) -> tuple[wire.NicSummary, ...]:
        """Wait for the stream to end; per NIC, the count and digest of the frames sent."""
        if self._streamer is not None:
            await self._streamer
        for half in self.halves.values():
            self.host.metrics.captured.inc(half.counters.captured)
        return tuple(d.summary(nic_id) for nic_id, d in self._sent.items())

    async def give_back(self, used: dict[int, int] | None) -> None:
        self.given_back = True
        for nic_id, half in self.halves.items():
            u = None if used is None else used.get(nic_id)
            n = await asyncio.to_thread(half.give_back, u)
            c = half.counters
            log.info(
                "%s: nic%d gave back %d frames (used-idx %s; captured %d, relayed %d, consumed "
                "%d, drained %d, dropped %s)",
                self.mid, nic_id, n, u, c.captured, c.relayed, c.consumed, c.drained,
                dict(c.dropped),
            )  # fmt: skip

    def counters(self) -> tuple[tuple[str, int], ...]:
        out: list[tuple[str, int]] = []
        for nic_id, half in self.halves.items():
            for k, v in half.counters.to_dict().items():
                # "injected" and "held" happen on the destination host; it reports them.
                if isinstance(v, int) and k not in ("injected", "held"):
                    out.append((f"nic{nic_id}.{k}", v))
            for reason, v in half.counters.dropped.items():
                out.append((f"nic{nic_id}.dropped.{_slug(reason)}", v))
        return tuple(out)

    async def close(self) -> None:
        if self._streamer is not None and not self._streamer.done():
            self._streamer.cancel()
        if self.halves and not (self.done or self.given_back):
            # Failed before the owed frames left: whatever netpass holds goes back to the VM.
            with contextlib.suppress(NetpassError, OSError):
                await self.give_back(None)
        for half in self.halves.values():
            try:
                await asyncio.to_thread(half.close)
            except (DatapathError, OSError) as e:
                log.warning("%s: cleanup: %s", self.mid, e)
        if self.frames is not None:
            await self.frames.close()


# --- destination host ----------------------------------------------------------------------
@dataclass
class _Inbox:
    """Rescued frames of one NIC that arrived before the destination VM runs."""

    frames: collections.deque[bytes] = field(default_factory=collections.deque)


class DestSession:
    """Hold + bypass injection for one migration."""

    def __init__(self, mid: UUID, vm: str, nics: list[_Nic], host: HostAgent) -> None:
        self.mid, self.vm, self.host = mid, vm, host
        self.nics = {n.spec.nic_id: n for n in nics}
        self.halves: dict[int, DestNic] = {}
        self.inbox = {nic_id: _Inbox() for nic_id in self.nics}
        self.buffered_bytes = 0
        self.dropped_over_budget = 0
        self.started = asyncio.Event()
        self.source_ended = asyncio.Event()
        self.frames: Channel | None = None
        self.source_lost: str | None = None
        self.resume_ns = 0
        self.injected_ns: int | None = None  # when the last rescued frame went into the tap
        self.held = 0
        self._arrivals: list[tuple[float, int]] = []  # (monotonic time, frames) per FRAMES
        self._wake = asyncio.Event()
        self._digests = {nic_id: wire.FrameDigest() for nic_id in self.nics}
        self._early: asyncio.Task[None] | None = None
        self._aborted = False

    def wake(self) -> None:
        self._wake.set()

    def source_gone(self, why: str) -> None:
        """Nothing more will come from the source agent: deliver what arrived, then open."""
        if not self.source_ended.is_set():
            self.source_lost = why
            self.source_ended.set()
        self._wake.set()

    async def prepare(self) -> None:
        for nic_id, n in self.nics.items():
            half = DestNic(n.info, n.pid, n.netns)
            self.halves[nic_id] = half
            await asyncio.to_thread(half.prepare)

    async def hold(self) -> None:
        # In the loop's thread when the prepared change applies: a hand-off to a worker thread
        # costs more CPU than the change itself, at the moment the loading QEMU needs it.
        for half in self.halves.values():
            if not half.close_and_flush_prepared():
                await asyncio.to_thread(half.close_and_flush)
        if self._early is None:
            self._early = asyncio.create_task(self._inject_early())

    async def _inject_early(self) -> None:
        """Owed frames into the tap as they come while the VM has not run yet: QEMU reads a
        tap only while its VM runs, so they wait there, in order, and the guest has them the
        moment it runs. The hold is closed, so nothing else reaches that queue."""
        while not (self.started.is_set() or self._aborted):
            self._wake.clear()
            await self._move(early=True)
            await self._wake.wait()

    async def _move(self, early: bool = False) -> int:
        """Inject what the inbox holds (EARLY: what fits the tap queue of a VM not yet
        running); how many frames."""
        moved = 0
        for nic_id, box in self.inbox.items():
            n = min(256, len(box.frames))
            if early:
                n = min(n, self.halves[nic_id].room_before_start())
            if n <= 0:
                continue
            batch = [box.frames.popleft() for _ in range(n)]
            self.buffered_bytes -= sum(len(f) for f in batch)
            if early:  # they fit the tap queue (room_before_start): no send can wait
                self.halves[nic_id].inject(batch)
            else:
                await asyncio.to_thread(self.halves[nic_id].inject, batch)
            self.injected_ns = time.time_ns()
            self._digests[nic_id].update_many(wire.FrameRecord(f) for f in batch)
            self.host.metrics.injected.inc(len(batch))
            moved += len(batch)
        return moved

    def on_frames(self, msg: wire.Frames) -> None:
        """Frames from the source agent: checked, then queued (the budget drops the newest)."""
        n = self.nics[msg.nic_id]
        box = self.inbox[msg.nic_id]
        for rec in msg.frames:
            d = rec.data
            if len(d) < 14 or (d[:6] != n.spec.mac and not d[0] & BROADCAST_OR_MULTICAST):
                raise SessionError(
                    f"frame for {_mac_text(d[:6])} on NIC {msg.nic_id}, whose MAC is "
                    f"{_mac_text(n.spec.mac)}: nothing of this batch is injected"
                )
        self._arrivals.append((time.monotonic(), len(msg.frames)))
        for rec in msg.frames:
            if self.buffered_bytes + len(rec.data) > self.host.frame_budget:
                self.dropped_over_budget += 1
                self.host.metrics.dropped.labels("over the frame budget").inc()
                continue
            self.buffered_bytes += len(rec.data)
            box.frames.append(rec.data)
        self._wake.set()

    def vm_started(self, resume_ns: int) -> None:
        self.resume_ns = resume_ns  # the destination's RESUME, on this host's clock
        for half in self.halves.values():
            # Migrations this host receives at once share one catch-up budget: four guests
            # each handed 6 frames/ms on a busy host dropped replies (test_four_vms_at_once).
            half.set_catchup(catchup_for(self._arrival_per_ms(), sharing=len(self.host.dest)))
        self.started.set()
        self._wake.set()

    def _arrival_per_ms(self) -> float | None:
        # The first FRAMES after the stop carry the backlog (frames relayed to the source guest
        # that it never took, plus what arrived since the stop); after that the source agent
        # streams frames as they arrive, so their rate is the arrival rate.
        if not self._arrivals:
            return None
        t0 = self._arrivals[0][0] + BACKLOG_BURST_S  # the backlog comes in one burst
        later = sum(n for t, n in self._arrivals if t > t0)
        elapsed_ms = (time.monotonic() - t0) * 1000
        return later / elapsed_ms if elapsed_ms >= 5 else None

    async def deliver(self) -> tuple[wire.NicSummary, ...]:
        """Once the VM runs: inject in order as frames come, then release the hold."""
        await self.started.wait()
        if self._early is not None:
            await self._early  # it ends at the start; its frames went first
        while True:
            self._wake.clear()
            if await self._move():
                continue
            if self.source_ended.is_set():
                break
            try:
                await asyncio.wait_for(self._wake.wait(), SOURCE_END_TIMEOUT_S)
            except TimeoutError:
                self.source_lost = "the source agent sent nothing for 30 s"
                break
        for half in self.halves.values():
            self.held += await asyncio.to_thread(half.release)
        return tuple(d.summary(nic_id) for nic_id, d in self._digests.items())

    async def discard(self) -> None:
        """The migration failed: the VM never runs here; what reached its tap dies with it
        (the source agent gives its own copy back to the source VM)."""
        await self._stop_early()
        for box in self.inbox.values():
            box.frames.clear()
        self.buffered_bytes = 0
        for half in self.halves.values():
            await asyncio.to_thread(half.hold.open)

    def counters(self) -> tuple[tuple[str, int], ...]:
        out = [("dropped_over_budget", self.dropped_over_budget),
               ("source_lost", int(self.source_lost is not None)), ("held", self.held)]  # fmt: skip
        if self.injected_ns is not None and self.resume_ns:
            after_us = max(0, self.injected_ns - self.resume_ns) // 1000
            out.append(("rescued_injected_after_resume_us", after_us))
        for nic_id, half in self.halves.items():
            out += [(f"nic{nic_id}.injected", half.injected),
                    (f"nic{nic_id}.flood_discarded", half.flood_discarded)]  # fmt: skip
        return tuple(out)

    async def _stop_early(self) -> None:
        """End the early injection (the VM will not run here) and wait for it."""
        self._aborted = True
        self._wake.set()
        if self._early is not None:
            await self._early

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._stop_early()  # its failure was reported where it was awaited
        for half in self.halves.values():
            try:
                await asyncio.to_thread(half.close)
            except (DatapathError, OSError) as e:
                log.warning("%s: cleanup: %s", self.mid, e)


def _slug(reason: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in reason)[:40].strip("_") or "other"


Summaries = tuple[wire.NicSummary, ...]
ControlEvent = wire.Event | BaseException  # a control message, or what ended the channel
OnEvent = Callable[[asyncio.Task[Summaries], ControlEvent], Awaitable[str | None]]


async def _end_listening(
    ch: Channel,
    mid: UUID,
    work: Coroutine[Any, Any, Summaries],
    counters: Callable[[], tuple[tuple[str, int], ...]],
    on_event: OnEvent,
) -> str:
    """A half's last stretch (WORK) while the control channel is still read: when WORK ends,
    COUNTS and END go out and ACK(END) must come back ("completed"). Meanwhile each control
    event (or the error that ended the channel) goes to ON_EVENT, which returns the outcome
    to stop with, or None to go on."""
    task = asyncio.create_task(work)
    nxt: asyncio.Task[wire.Event] = asyncio.create_task(ch.recv())
    try:
        while True:
            # Once ON_EVENT called the work off (RESUMED: the frames went back to the source
            # VM), only the control channel is left to read; its cancelled task is no result.
            waiting = {nxt} if task.cancelled() else {task, nxt}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if task in done and not task.cancelled():
                summaries = task.result()
                await ch.send(wire.Counts(mid, counters()))
                await ch.send(wire.End(mid, summaries))
                ack = await nxt
                if not isinstance(ack, wire.Ack):
                    raise SessionError(f"expected ACK(END), got {type(ack).__name__}")
                return "completed"
            if nxt not in done:
                continue  # the work was just called off; the channel has said nothing yet
            exc = nxt.exception()
            outcome = await on_event(task, exc if exc is not None else nxt.result())
            if outcome is not None:
                return outcome
            nxt = asyncio.create_task(ch.recv())
    finally:
        for t in (task, nxt):
            t.cancel()
        await asyncio.gather(task, nxt, return_exceptions=True)


# --- the agent -----------------------------------------------------------------------------
class HostAgent:
    """Serves the orchestrator (control channel) and source agents (frame channel)."""

    def __init__(
        self,
        identity: str,
        client_ctx: ssl.SSLContext,
        registry: CollectorRegistry,
        frame_budget: int = DEFAULT_FRAME_BUDGET,
    ) -> None:
        self.identity = identity
        self.client_ctx = client_ctx
        self.frame_budget = frame_budget
        self.metrics = HostMetrics(registry)
        self.dest: dict[UUID, DestSession] = {}

    # Control channel: one connection per orchestrator, one migration at a time on it.
    async def control(self, ch: Channel) -> None:
        while True:
            ev = await ch.recv()
            if isinstance(ev, wire.Prepare):
                await self._migration(ch, ev)
            elif isinstance(ev, wire.Bye | wire.Error | wire.ConnectionClosed):
                return

    async def _migration(self, ch: Channel, prep: wire.Prepare) -> None:
        mid = prep.migration_id
        nics: list[_Nic] = []
        try:
            for spec in prep.nics:
                nics.append(self._nic(spec))
        except (DatapathError, HostError) as e:
            for n in nics:
                n.close()
            await ch.send(wire.Abort(mid, f"cannot prepare: {e}"[:1024]))
            await ch.expect(wire.Ack)
            return
        # Both halves exist until CAPTURE_ON says which one this host is: a source agent may
        # open the frame channel (naming this migration) before our CAPTURE_ON arrives.
        dest_half = DestSession(mid, prep.vm_name, nics, self)
        self.dest[mid] = dest_half
        src: SourceSession | None = SourceSession(mid, prep.vm_name, nics, self)
        dst: DestSession | None = dest_half
        await ch.send(wire.Prepared(mid))
        side = "?"
        outcome = "failed"
        try:
            while True:
                ev = await ch.recv()
                if isinstance(ev, wire.NicFilter) and src is not None:
                    src.set_filter(ev)
                elif isinstance(ev, wire.Peer) and src is not None:
                    src.peer = ev
                elif isinstance(ev, wire.CaptureOn):
                    if src is not None and src.peer is not None:
                        side, dst = "source", None
                        self.dest.pop(mid, None)
                        await src.capture_on()
                    elif dst is not None:
                        side, src = "destination", None
                        await dst.prepare()
                    await ch.send(wire.Ack(mid, wire.MsgType.CAPTURE_ON))
                elif isinstance(ev, wire.UsedIdx) and src is not None:
                    if ev.phase == wire.UsedPhase.FINAL:
                        await src.final(ev.entries)
                        outcome = await self._source_end(ch, src)
                        return
                    if ev.phase == wire.UsedPhase.RESUMED:
                        await src.give_back(dict(ev.entries))
                    else:
                        src.used_idx(ev.phase, ev.entries)
                elif isinstance(ev, wire.Hold) and (src is not None or dst is not None):
                    if dst is not None:
                        await dst.hold()  # once ACKed, the VM may start
                    elif src is not None:
                        src.flood_point()  # 1.2: floods reach the destination's hold now
                    if wire.Feature.HOLD_ACK in ch.features:
                        await ch.send(wire.Ack(mid, wire.MsgType.HOLD))
                elif isinstance(ev, wire.VmStarted) and dst is not None:
                    dst.vm_started(ev.started_ns)
                    if dst.frames is not None:
                        try:
                            await dst.frames.send(wire.VmStarted(mid, time.time_ns()))
                        except (ChannelError, NetpassError) as e:
                            dst.source_gone(f"frame channel: {e}")  # the VM runs: deliver
                    outcome = await self._dest_end(ch, dst)
                    return
                elif isinstance(ev, wire.Abort):
                    try:
                        if src is not None and side == "source":
                            await src.give_back(None)
                        if dst is not None:
                            await dst.discard()
                    except (NetpassError, OSError) as e:
                        # Acknowledged all the same: the orchestrator would otherwise wait
                        # for an ACK that never comes (an ABORT may not answer an ABORT).
                        log.warning("migration %s (%s): on ABORT: %s", mid, side, e)
                    await ch.send(wire.Ack(mid, wire.MsgType.ABORT))
                    outcome = "aborted"
                    return
                elif isinstance(ev, wire.Bye | wire.Error | wire.ConnectionClosed):
                    outcome = "channel lost"
                    if src is not None and side == "source":
                        await src.give_back(None)
                    return
        except (NetpassError, ChannelError, TimeoutError) as e:
            log.warning("migration %s (%s): %s", mid, side, e)
            with contextlib.suppress(NetpassError, ChannelError):
                await ch.send(wire.Abort(mid, str(e)[:1024]))
        finally:
            self.metrics.migrations.labels(side, outcome).inc()
            self.dest.pop(mid, None)
            for s in (src, dst):
                if s is not None:
                    await s.close()
            for n in nics:
                n.close()

    async def _source_end(self, ch: Channel, src: SourceSession) -> str:
        """After the stop: stream until the destination ran and the source went quiet, while
        still listening to the orchestrator (the migration can fail after the stop)."""

        async def on_event(fin: asyncio.Task[Summaries], ev: ControlEvent) -> str | None:
            if isinstance(ev, BaseException):
                raise ev
            if isinstance(ev, wire.UsedIdx) and ev.phase == wire.UsedPhase.RESUMED:
                fin.cancel()
                await src.give_back(dict(ev.entries))
            elif isinstance(ev, wire.Abort):
                fin.cancel()
                await ch.send(wire.Ack(src.mid, wire.MsgType.ABORT))
                return "aborted"
            elif isinstance(ev, wire.Bye | wire.Error | wire.ConnectionClosed):
                return "channel lost"
            return None

        return await _end_listening(ch, src.mid, src.finish(), src.counters, on_event)

    async def _dest_end(self, ch: Channel, dst: DestSession) -> str:
        """After the destination VM started: deliver what the source agent sends, while still
        listening to the orchestrator: if it gives up on the source agent (ABORT) or goes
        away, the destination stops waiting and opens its hold now, not after 30 s."""

        async def on_event(deliver: asyncio.Task[Summaries], ev: ControlEvent) -> str | None:
            if isinstance(ev, wire.Abort):
                dst.source_gone(f"the orchestrator aborted: {ev.reason}")
                await deliver  # injects what came, then opens the hold
                await ch.send(wire.Ack(dst.mid, wire.MsgType.ABORT))
                return "aborted"
            if isinstance(ev, BaseException | wire.Bye | wire.Error | wire.ConnectionClosed):
                dst.source_gone(f"control channel lost: {ev}")
                await deliver
                return "channel lost"
            return None

        return await _end_listening(ch, dst.mid, dst.deliver(), dst.counters, on_event)

    def _nic(self, spec: wire.NicSpec) -> _Nic:
        pid, fds = find_tap_owner(spec.tap)
        nic = _Nic(spec, pid, _nic_info(spec, fds))
        try:
            nic.ns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DatapathError(f"tap {spec.tap}: QEMU {pid} is gone ({e.strerror})") from e
        return nic

    # Frame channel: a source agent streams one migration's owed frames.
    async def frames(self, ch: Channel) -> None:
        """The source agent's stream of owed frames for one migration. However this
        channel ends (END, a close, a reset), the destination stops waiting for more."""
        session: DestSession | None = None
        try:
            while True:
                ev = await ch.recv()
                if isinstance(ev, wire.Prepare):
                    session = self.dest.get(ev.migration_id)
                    if session is None:
                        await ch.abort_with(
                            wire.ErrorCode.APPLICATION, f"unknown migration {ev.migration_id}"
                        )
                        return
                    session.frames = ch
                    await ch.send(wire.Prepared(ev.migration_id))
                elif isinstance(ev, wire.CaptureOn) and session is not None:
                    await ch.send(wire.Ack(ev.migration_id, wire.MsgType.CAPTURE_ON))
                elif isinstance(ev, wire.Frames) and session is not None:
                    try:
                        session.on_frames(ev)
                    except SessionError as e:
                        await ch.abort_with(wire.ErrorCode.APPLICATION, str(e))
                        return
                elif isinstance(ev, wire.End) and session is not None:
                    session.source_ended.set()
                    session.wake()
                    await ch.send(wire.Ack(ev.migration_id, wire.MsgType.END))
                elif isinstance(ev, wire.Abort) and session is not None:
                    await ch.send(wire.Ack(ev.migration_id, wire.MsgType.ABORT))
                elif isinstance(ev, wire.Bye | wire.Error | wire.ConnectionClosed):
                    return
        finally:
            if session is not None and not session.source_ended.is_set():
                session.source_gone("the frame channel from the source agent ended before END")
