"""The migration timeline when source and destination are different hosts, top to bottom.

Same switchover as `orchestrator.NetpassTimeline` (docs/design.md), but each host's half runs
in that host's agent (docs/agent.md, "Two hosts"): netpass keeps QMP and tells the agents what
it says over mutual-TLS control channels; the owed frames go from the source agent straight to
the destination agent. A channel that fails never fails the migration: it goes on as a stock
one and the cause is reported in timing.netpass["error"].
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import uuid4

from netpass import wire
from netpass.agent.channel import Channel, ChannelError, connect
from netpass.agent.clock import ClockEstimate, estimate_offset
from netpass.deststart import DestStart, src_failed
from netpass.discovery import NicInfo, discover, used_idx
from netpass.errors import MigrationError, NetpassError, UsageError
from netpass.orchestrator import (
    Phase,
    ProgressFn,
    _check_ready,
    _measure,
    _params,
    _sessions,
    _set_caps,
    _status,
    migrate_stock,
    stable_used,
    start_migration,
    used_at_stop,
    wait_completed,
)
from netpass.qmp import Qmp, is_event
from netpass.results import MigrationTiming
from netpass.sysutil import gc_frozen
from netpass.wire import Feature

M = TypeVar("M", bound=wire.Message)
NETPASS_MODES = ("required", "preferred", "off")


@dataclass(frozen=True)
class AgentAddress:
    """Where a host's agent listens: control channel on PORT, frame channel on PORT + 1."""

    host: str
    port: int
    server_name: str = ""
    netns: str | None = None  # reach it from this network namespace (the lab)

    @classmethod
    def parse(cls, text: str) -> AgentAddress:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) < 65535:
            raise UsageError(f"agent address {text!r}: expected HOST:PORT")
        return cls(host.strip("[]"), int(port))

    @property
    def frame_port(self) -> int:
        return self.port + 1


async def migrate_two_hosts(
    src_qmp: str,
    dst_qmp: str,
    uri: str,
    src_agent: AgentAddress,
    dst_agent: AgentAddress,
    tls: ssl.SSLContext,
    *,
    netpass: str = "required",
    postcopy: bool = False,
    downtime_ms: int | None = None,
    max_bandwidth: int | None = None,
    progress: ProgressFn | None = None,
    timeout: float = 300.0,
    early_start: bool = True,
) -> MigrationTiming:
    """Migrate with the per-host agents doing each host's half of the switchover.

    NETPASS: 'required' refuses to start without both agents; 'preferred' falls back to a stock
    migration (reported) when an agent is unreachable or lacks the SWITCHOVER feature; 'off' is
    a stock migration."""
    if netpass not in NETPASS_MODES:
        raise UsageError(f"--netpass must be one of {', '.join(NETPASS_MODES)}")
    params = _params(downtime_ms, max_bandwidth)
    kw: dict[str, Any] = dict(
        postcopy=postcopy,
        downtime_ms=downtime_ms,
        max_bandwidth=max_bandwidth,
        progress=progress,
        timeout=timeout,
    )
    if netpass == "off":
        return await migrate_stock(src_qmp, dst_qmp, uri, **kw)
    try:
        src_ch = await _agent(src_agent, tls)
        try:
            dst_ch = await _agent(dst_agent, tls)
        except BaseException:
            await src_ch.close()
            raise
    except ChannelError as e:
        if netpass == "required":
            raise UsageError(
                f"netpass agent not usable: {e} (--netpass=preferred migrates stock)"
            ) from e
        timing = await migrate_stock(src_qmp, dst_qmp, uri, **kw)
        timing.netpass = {"error": f"stock migration: netpass agent not usable: {e}"}
        return timing
    try:
        async with _sessions(src_qmp, dst_qmp) as (src, dst):
            tl = TwoHostTimeline(src, dst, uri, src_ch, dst_ch, dst_agent, postcopy, params)
            tl.phase.progress, tl.timeout, tl.early_start = progress, timeout, early_start
            with gc_frozen():  # no long garbage-collector pause in the timeline
                return await tl.run()
    finally:
        for ch in (src_ch, dst_ch):
            with contextlib.suppress(ChannelError, OSError):
                await ch.close()


async def _agent(addr: AgentAddress, tls: ssl.SSLContext) -> Channel:
    return await connect(
        addr.host,
        addr.port,
        tls,
        wire.Role.ORCHESTRATOR,
        socket.gethostname(),
        server_hostname=addr.server_name or None,
        require_features=wire.Feature.SWITCHOVER,
        netns=addr.netns,
    )


async def _expect(
    ch: Channel,
    kind: type[M],
    who: str,
    timeout: float = 30.0,
    counts: dict[str, int] | None = None,
) -> M:
    """The next message of KIND from the WHO ('source'/'destination') agent; COUNTS go into
    COUNTS. Anything else ends the channel with an error that names the agent."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            ev = await asyncio.wait_for(ch.recv(), deadline - asyncio.get_running_loop().time())
        except TimeoutError:
            raise ChannelError(f"{who} agent: no {kind.__name__} within {timeout:g} s") from None
        except (ChannelError, NetpassError) as e:
            raise ChannelError(f"{who} agent: {e}") from e
        if isinstance(ev, kind):
            return ev
        if isinstance(ev, wire.Abort):
            with contextlib.suppress(NetpassError, ChannelError):
                await ch.send(wire.Ack(ev.migration_id, wire.MsgType.ABORT))
            raise ChannelError(f"{who} agent aborted: {ev.reason}")
        if isinstance(ev, wire.Error | wire.ConnectionClosed | wire.Bye):
            raise ChannelError(f"{who} agent closed the channel: {ev}")
        if isinstance(ev, wire.Counts) and counts is not None:
            counts.update(ev.counters)


async def _expect_ack(ch: Channel, acked: wire.MsgType, who: str, timeout: float) -> None:
    """The ACK of ACKED. Other ACKs are skipped: the source agent's ACK(HOLD), which nothing
    waits for, may still be unread."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await _expect(ch, wire.Ack, who, max(0.0, deadline - loop.time()))).acked != acked:
        pass


class TwoHostTimeline:
    def __init__(
        self,
        src: Qmp,
        dst: Qmp,
        uri: str,
        src_ch: Channel,
        dst_ch: Channel,
        dst_agent: AgentAddress,
        postcopy: bool,
        params: dict[str, int],
    ) -> None:
        self.src, self.dst, self.uri = src, dst, uri
        self.src_ch, self.dst_ch, self.dst_agent = src_ch, dst_ch, dst_agent
        self.postcopy, self.params = postcopy, params
        self.timeout = 300.0
        self.timing = MigrationTiming(mode="netpass", postcopy=postcopy)
        self.mid = uuid4()
        self.nics: list[NicInfo] = []
        self.error: str | None = None
        self.live = False  # the agents take part (until a channel fails)
        self.phase = Phase(None)
        self.summaries: dict[str, tuple[wire.NicSummary, ...]] = {}
        self.clocks: tuple[ClockEstimate, ClockEstimate] | None = None
        self.counts: dict[str, dict[str, int]] = {}
        self.early_start = True  # may the destination get `cont` while it loads
        self.start = DestStart(src, dst, postcopy)
        self.armed = False  # postcopy: HOLD went to the destination before the source stopped
        # The used-idx read while the source is stopped (queued at its STOP; QEMU answers once
        # the device state is out), and whether the source agent has it as USED_IDX(FINAL).
        self.at_stop: asyncio.Task[list[tuple[int, int]] | None] | None = None
        self.final_sent = False

    def _fail(self, e: BaseException) -> None:
        self.live = False
        if self.error is None:
            self.error = str(e) or type(e).__name__

    async def _send(self, who: str, msg: wire.Message) -> None:
        """Send to the WHO ('source'/'destination') agent; a failure names that agent."""
        ch = self.src_ch if who == "source" else self.dst_ch
        try:
            await ch.send(msg)
        except (ChannelError, NetpassError) as e:
            raise ChannelError(f"{who} agent: {e}") from e

    async def run(self) -> MigrationTiming:
        await _check_ready(self.src, self.dst)
        # STOP is stamped by the source host's clock, RESUME by the destination's: measure how
        # far apart they are (NTP style, through each agent) to correct the pause.
        try:
            self.clocks = (await estimate_offset(self.src_ch), await estimate_offset(self.dst_ch))
        except (ChannelError, NetpassError, TimeoutError) as e:
            raise UsageError(f"netpass agents do not answer: {e}") from e
        await self._prepare()
        failed: MigrationError | None = None
        try:
            await self._capture_on()
            await self._start_migration()
            watcher = asyncio.create_task(self._watch())
            try:
                if await self._switchover():
                    await self._finish()
                else:
                    failed = await self._give_back()
            finally:
                watcher.cancel()
        finally:
            if self.at_stop is not None:
                self.at_stop.cancel()  # a no-op once it is done; then its error is read here
                if self.at_stop.done() and not self.at_stop.cancelled():
                    self.at_stop.exception()
            await _measure(self.timing, self.src, self.dst)
            self._report()
        if failed is not None:
            raise failed
        return self.timing

    # 1. Prepare: NICs from QMP, each agent finds its tap and its QEMU.
    async def _prepare(self) -> None:
        svm = await discover(self.src, local=False)
        dvm = await discover(self.dst, local=False)
        by_mac = {n.mac: n for n in dvm.nics}
        src_specs, dst_specs = [], []
        for slot, n in enumerate(svm.nics):
            d = by_mac.get(n.mac)
            if d is None:
                raise UsageError(f"destination has no NIC with MAC {n.mac} (source {n.nic_id})")
            mac = bytes.fromhex(n.mac.replace(":", ""))
            src_specs.append(wire.NicSpec(slot, n.tap, mac))
            dst_specs.append(wire.NicSpec(slot, d.tap, mac))
            self.nics.append(n)
        vm = str((await self.src.cmd("query-name")).get("name") or "vm")[:255]
        try:
            await self._send("source", wire.Prepare(self.mid, vm, tuple(src_specs)))
            await self._send("destination", wire.Prepare(self.mid, vm, tuple(dst_specs)))
            await _expect(self.src_ch, wire.Prepared, "source")
            await _expect(self.dst_ch, wire.Prepared, "destination")
            for slot, n in enumerate(self.nics):
                await self._send("source", _nic_filter(self.mid, slot, n))
            a = self.dst_agent
            await self._send("source", wire.Peer(self.mid, a.host, a.frame_port, a.server_name))
        except (ChannelError, TimeoutError) as e:
            raise UsageError(f"netpass agents could not prepare the migration: {e}") from e
        self.live = True
        await _set_caps(self.src, self.dst, self.postcopy, False)
        if self.params:
            await self.src.cmd("migrate-set-parameters", **self.params)
        if not self.early_start:
            await self.start.decide("disabled (--late-start)")
        elif Feature.HOLD_ACK not in self.dst_ch.features:
            await self.start.decide("the destination agent does not confirm its hold (< 1.2)")
        else:
            await self.start.decide()

    # 2. Capture on at the source, the relay's baseline, the destination armed.
    async def _capture_on(self) -> None:
        try:
            await self._send("source", wire.CaptureOn(self.mid))
            await _expect(self.src_ch, wire.Ack, "source")
            base = [(slot, await stable_used(self.src, n)) for slot, n in enumerate(self.nics)]
            await self._used(wire.UsedPhase.BASELINE, base)
            await self._send("destination", wire.CaptureOn(self.mid))
            await _expect(self.dst_ch, wire.Ack, "destination")
        except (ChannelError, NetpassError, TimeoutError) as e:
            self._fail(e)
            await self._abort_agents()

    async def _used(self, phase: wire.UsedPhase, entries: list[tuple[int, int]]) -> None:
        await self._send("source", wire.UsedIdx(self.mid, phase, tuple(entries)))

    async def _start_migration(self) -> None:
        await start_migration(
            self.src, self.dst, self.uri, self.postcopy, self.timing, self.phase,
            self._arm_destination,
        )  # fmt: skip

    async def _watch(self) -> None:
        while True:
            info = await self.src.cmd("query-migrate")
            self.phase.poll(info)
            if self.live and self.phase.source_runs:
                with contextlib.suppress(MigrationError):
                    seen = [(s, await used_idx(self.src, n)) for s, n in enumerate(self.nics)]
                    msg = wire.UsedIdx(self.mid, wire.UsedPhase.OBSERVE, tuple(seen))
                    # The STOP may have come while QMP answered: phases only move forward.
                    if self.live and self.phase.source_runs and self.src_ch.conn.can_send(msg):
                        try:
                            await self._send("source", msg)
                        except (ChannelError, NetpassError) as e:
                            self._fail(e)
            await asyncio.sleep(0.1)

    # 3. Switchover: QEMU stops the source by itself; the agents split and move the frames.
    async def _switchover(self) -> bool:
        ev = await self.src.wait_event(
            lambda e: e.name == "STOP" or src_failed(e), self.timeout, what="the source to stop"
        )
        if ev.name != "STOP":
            return False
        self.phase.enter("switch")
        self.start.source_stopped()
        await self._hold()
        self.at_stop = asyncio.create_task(self._read_at_stop())
        later = self._accounts_after_resume
        accounting = None if later else asyncio.create_task(self._account())
        try:

            async def ready() -> None:
                # The hold is closed before the destination may run (and, as in one host, the
                # source agent has the final used-idx, unless that waits for the RESUME).
                if self.live and not self.armed and Feature.HOLD_ACK in self.dst_ch.features:
                    await self._hold_confirmed()
                if accounting is not None:
                    await accounting

            started = await self.start.run(ready, self.timeout)
        finally:
            if accounting is not None:
                await accounting
        if not started:
            return False
        resume = await self.dst.wait_event(is_event("RESUME"), 30, what="destination RESUME")
        self.timing.dst_resume_ns = resume.t_ns
        if self.live:
            try:
                await self._send("destination", wire.VmStarted(self.mid, resume.t_ns))
            except (ChannelError, NetpassError) as e:
                self._fail(e)
        if later:
            await self._account()
        self.phase.enter("deliver")
        return True

    @property
    def _accounts_after_resume(self) -> bool:
        """With the early `cont` (postcopy: already sent; precopy: sent once the hold is
        closed) the destination starts by itself once it has the device state, and the
        accounting, the source agent's drain and stream and the destination agent's injection
        wait until it runs, off the CPU it loads and starts on (the owed frames go in just
        after RESUME). The stopped source's used-idx does not move meanwhile (it is read at
        the STOP); a failure before RESUME gives back with that reading, if QEMU answered it
        before the source ran again, and the one read after."""
        return self.start.refusal is None

    async def _hold(self) -> None:
        """The source agent stops relaying; the destination agent closes its hold (postcopy:
        closed before already)."""
        if not self.live:
            return
        try:
            await self._used(wire.UsedPhase.STOPPED, [])
            if not self.armed:
                await self._send("destination", wire.Hold(self.mid))
        except (ChannelError, NetpassError) as e:
            self._fail(e)

    async def _arm_destination(self) -> None:
        """Postcopy: netpass itself says when the source stops, so the destination is readied
        before: its hold closed and confirmed, the source agent told that floods now reach
        the destination (it stops relaying them), and the early `cont`, which QEMU runs while
        the destination is not yet loading device state: it then starts the VM as soon as
        it has it, as a stock destination would."""
        if not (self.live and Feature.HOLD_ACK in self.dst_ch.features):
            return  # a 1.1 agent: everything at the stop, as in precopy
        try:
            await self._send("destination", wire.Hold(self.mid))
        except (ChannelError, NetpassError) as e:
            self._fail(e)
            return
        self.armed = True
        await self._hold_confirmed()
        if self.live:
            await self.start.cont_now()

    async def _hold_confirmed(self) -> None:
        """Wait for ACK(HOLD), then tell the source agent that floods now reach the
        destination's hold (it neither relays nor owes them from then on)."""
        try:
            ack = await _expect(self.dst_ch, wire.Ack, "destination", timeout=5)
            if ack.acked != wire.MsgType.HOLD:
                raise ChannelError(f"destination agent: ACK({ack.acked.name}) instead of ACK(HOLD)")
            if Feature.HOLD_ACK in self.src_ch.features:
                await self._send("source", wire.Hold(self.mid))  # the flood point
        except (ChannelError, NetpassError, TimeoutError) as e:
            self._fail(e)

    async def _read_at_stop(self) -> list[tuple[int, int]] | None:
        used = await used_at_stop(self.src, self.nics)
        return None if used is None else list(enumerate(used))

    async def _account(self) -> None:
        """USED_IDX(FINAL) with the reading taken at the STOP, once; none if the source ran
        again before QEMU answered it (the give-back then has only the resumed reading)."""
        if not self.live or self.final_sent:
            return
        try:
            assert self.at_stop is not None
            final = await self.at_stop
            if final is None:
                return
            await self._used(wire.UsedPhase.FINAL, final)
            self.final_sent = True
        except (ChannelError, NetpassError) as e:
            self._fail(e)

    # 4. The agents report; the migration finishes.
    async def _finish(self) -> None:
        if self.live:
            # Each side on its own: when the source agent fails, the destination agent still
            # injects what reached it, opens its hold and reports what it delivered.
            for side, ch in (("source", self.src_ch), ("destination", self.dst_ch)):
                self.counts[side] = {}
                try:
                    end = await _expect(ch, wire.End, side, timeout=15, counts=self.counts[side])
                    self.summaries[side] = end.nics
                    await self._send(side, wire.Ack(self.mid, wire.MsgType.END))
                except (ChannelError, NetpassError, TimeoutError) as e:
                    self._fail(e)
        await wait_completed(self.src, self.dst, self.timing, self.timeout)
        self.phase.enter("completed")

    # 5. Failure after capture-on: the source VM runs again and gets its frames back.
    async def _give_back(self) -> MigrationError:
        self.phase.enter("give-back")
        if await _status(self.src) != "running":
            await self.src.wait_event(is_event("RESUME"), 30, what="source RESUME after failure")
        if self.at_stop is not None:
            # The accounting first, with the used-idx read during the stop: the give-back is
            # then exact, frames QEMU dropped at its own stop included.
            await self._account()
        if self.live:
            try:
                await asyncio.sleep(0.02)
                now = [(s, await used_idx(self.src, n)) for s, n in enumerate(self.nics)]
                await self._used(wire.UsedPhase.RESUMED, now)
            except (ChannelError, NetpassError) as e:
                self._fail(e)
        await self._abort_agents()
        end = next(e for e in self.src.events if src_failed(e))
        return MigrationError(
            f"migration {end.data['status']}; the source VM runs again with the frames netpass held"
        )

    async def _abort_agents(self) -> None:
        for who, ch in (("source", self.src_ch), ("destination", self.dst_ch)):
            with contextlib.suppress(ChannelError, NetpassError, TimeoutError):
                if ch.conn.migration_id is not None:
                    await self._send(who, wire.Abort(self.mid, "migration failed"))
                    await _expect_ack(ch, wire.MsgType.ABORT, who, timeout=10)
        self.live = False

    def _report(self) -> None:
        flat: dict[str, object] = {"agents": True}
        t = self.timing
        if self.clocks is not None:
            src_clock, dst_clock = self.clocks
            offset = dst_clock.offset_ns - src_clock.offset_ns  # destination minus source
            flat["clock offset dst-src (ms)"] = round(offset / 1e6, 3)
            flat["pause uncertainty ± (ms)"] = round(
                (src_clock.uncertainty_ns + dst_clock.uncertainty_ns) / 1e6, 3
            )
            if t.src_stop_ns and t.dst_resume_ns:
                flat["pause corrected (ms)"] = round(
                    (t.dst_resume_ns - offset - t.src_stop_ns) / 1e6, 3
                )
        src = {s.nic_id: s for s in self.summaries.get("source", ())}
        dst = {s.nic_id: s for s in self.summaries.get("destination", ())}
        flat["sent by the source agent"] = sum(s.frame_count for s in src.values())
        flat["rescued"] = flat["sent by the source agent"]
        flat["injected"] = sum(s.frame_count for s in dst.values())
        if src and dst:
            flat["digests match"] = all(
                dst.get(k) is not None and dst[k].digest == s.digest for k, s in src.items()
            )
        d = self.counts.get("destination", {})
        if "rescued_injected_after_resume_us" in d:
            flat["rescued injected after RESUME (ms)"] = d["rescued_injected_after_resume_us"] / 1e3
        if "held" in d:
            flat["held"] = d["held"]
        for side, counts in self.counts.items():
            for k, v in counts.items():
                flat[f"{side} {k}"] = v
        flat.update(self.start.report())
        flat["accounting"] = (
            "after the destination's RESUME" if self._accounts_after_resume else "at the stop"
        )
        if self.error:
            flat["error"] = self.error
        self.timing.netpass = flat


def _nic_filter(mid: Any, slot: int, n: NicInfo) -> wire.NicFilter:
    f = n.rx_filter
    flags = wire.NicFilterFlag(0)
    if f.promiscuous:
        flags |= wire.NicFilterFlag.PROMISCUOUS
    if f.multicast_all:
        flags |= wire.NicFilterFlag.ALL_MULTICAST
    if f.unicast_all:
        flags |= wire.NicFilterFlag.ALL_UNICAST
    return wire.NicFilter(mid, slot, flags, tuple(sorted(f.multicast)), tuple(sorted(f.unicast)))
