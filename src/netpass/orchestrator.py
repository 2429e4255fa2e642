"""The migration timeline, top to bottom.

Stock mode is QEMU's own switchover, measured: source STOP -> destination RESUME from QMP event
timestamps, QEMU's reported downtime (re-queried: it reads 0 right at completion), total time and
bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from netpass.deststart import DestStart
from netpass.discovery import NicInfo, discover, qemu_has_flag, used_idx
from netpass.errors import DatapathError, HostError, MigrationError, UsageError
from netpass.qmp import Event, Qmp, is_event
from netpass.results import MigrationTiming
from netpass.switchover import (
    EARLY_POLL_S,
    QUIET_S,
    RESCUE_DEADLINE_S,
    DestNic,
    SourceNic,
    catchup_for,
)
from netpass.sysutil import gc_frozen

FINAL_STATES = ("completed", "failed", "cancelled")


@dataclass
class Progress:
    phase: str
    status: str = ""
    ram_remaining: int = 0
    ram_total: int = 0
    ram_transferred: int = 0


ProgressFn = Callable[[Progress], None]


def _params(downtime_ms: int | None, max_bandwidth: int | None) -> dict[str, int]:
    params = {}
    if downtime_ms is not None:
        params["downtime-limit"] = downtime_ms
    if max_bandwidth is not None:
        params["max-bandwidth"] = max_bandwidth
    return params


async def _status(q: Qmp) -> str:
    return str((await q.cmd("query-status"))["status"])


async def _check_ready(src: Qmp, dst: Qmp) -> None:
    """Refuse to start unless the source runs and the destination waits for an incoming stream."""
    s = await _status(src)
    if s != "running":
        raise UsageError(f"source VM is {s!r}, not running")
    info = await src.cmd("query-migrate")
    if info.get("status") in ("setup", "active", "postcopy-active", "pre-switchover", "device"):
        raise UsageError(f"a migration is already running on the source ({info['status']})")
    d = await _status(dst)
    if d != "inmigrate":
        raise UsageError(f"destination VM is {d!r}: start it with -incoming defer")


async def _set_caps(src: Qmp, dst: Qmp, postcopy: bool, pause: bool) -> None:
    """Every capability netpass relies on, set explicitly: a VM that arrived by migration keeps
    the capabilities its incoming side had (e.g. postcopy-ram), which a new destination may
    not share."""

    def caps(**on: bool) -> list[dict[str, object]]:
        return [{"capability": k.replace("_", "-"), "state": v} for k, v in on.items()]

    await dst.cmd("migrate-set-capabilities", capabilities=caps(events=True, postcopy_ram=postcopy))
    await src.cmd(
        "migrate-set-capabilities",
        capabilities=caps(events=True, postcopy_ram=postcopy, pause_before_switchover=pause),
    )


async def _wait_active(src: Qmp) -> None:
    ev = await src.wait_event(
        lambda e: e.name == "MIGRATION" and e.data.get("status") in ("active", *FINAL_STATES),
        30,
        what="the migration to become active",
    )
    if ev.data["status"] != "active":
        info = await src.cmd("query-migrate")
        raise MigrationError(f"migration {ev.data['status']}: {info.get('error-desc', '')}")


async def _dst_completed(dst: Qmp) -> None:
    # In postcopy the destination still pulls pages after the source says 'completed'; the
    # source QEMU must live until the destination is done too.
    await dst.wait_event(is_event("MIGRATION", status="completed"), 60, what="destination")


async def _final_info(src: Qmp) -> dict[str, Any]:
    # downtime/total-time can read 0 just as the status turns 'completed': ask again.
    info: dict[str, Any] = {}
    for _ in range(20):
        info = await src.cmd("query-migrate")
        if info.get("downtime") and info.get("total-time"):
            break
        if info.get("status") in ("failed", "cancelled"):
            break  # no downtime to wait for: asking 20 times only made a failure 1 s slower
        await asyncio.sleep(0.05)
    return info


class Phase:
    """Where the timeline is. A change is reported at once, so a progress display (or a caller's
    hook) sees 'switch' when the source stops, not at the next 100 ms poll."""

    def __init__(self, progress: ProgressFn | None) -> None:
        self.name = "prepare"
        self.progress = progress
        self.info: dict[str, Any] = {}  # the last query-migrate answer

    def enter(self, name: str) -> None:
        self.name = name
        self._report()

    @property
    def source_runs(self) -> bool:
        """Migrating and the source not stopped yet: its RX used-idx still moves."""
        return self.name in ("precopy", "postcopy")

    def poll(self, info: dict[str, Any]) -> None:
        self.info = info
        self._report()

    def _report(self) -> None:
        if self.progress is None:
            return
        ram = self.info.get("ram", {})
        self.progress(
            Progress(
                self.name,
                str(self.info.get("status", "")),
                int(ram.get("remaining", 0)),
                int(ram.get("total", 0)),
                int(ram.get("transferred", 0)),
            )
        )


async def _watch_progress(src: Qmp, phase: Phase) -> None:
    while True:
        phase.poll(await src.cmd("query-migrate"))
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def _sessions(src_qmp: str, dst_qmp: str) -> AsyncIterator[tuple[Qmp, Qmp]]:
    """Both QMP sessions, closed whatever happens."""
    src, dst = Qmp("src", src_qmp), Qmp("dst", dst_qmp)
    await src.connect()
    try:
        await dst.connect()
        yield src, dst
    finally:
        await src.close()
        await dst.close()


async def _measure(timing: MigrationTiming, src: Qmp, dst: Qmp) -> None:
    """Pause from QEMU's event timestamps, QEMU's own figures, the event log."""
    stop = next((e for e in src.events if e.name == "STOP"), None)
    timing.src_stop_ns = stop.t_ns if stop else None
    if timing.src_stop_ns and timing.dst_resume_ns:
        timing.true_pause_ms = (timing.dst_resume_ns - timing.src_stop_ns) / 1e6
    with contextlib.suppress(MigrationError):
        _fill_info(timing, await _final_info(src))
    timing.events = [e.to_dict() for e in sorted([*src.events, *dst.events], key=_t)]


async def migrate_stock(
    src_qmp: str,
    dst_qmp: str,
    uri: str,
    *,
    postcopy: bool = False,
    downtime_ms: int | None = None,
    max_bandwidth: int | None = None,
    progress: ProgressFn | None = None,
    timeout: float = 300.0,
) -> MigrationTiming:
    """Migrate with QEMU's own switchover and measure it."""
    params = _params(downtime_ms, max_bandwidth)
    async with _sessions(src_qmp, dst_qmp) as (src, dst):
        return await _stock_timeline(src, dst, uri, postcopy, params, progress, timeout)


async def _stock_timeline(
    src: Qmp,
    dst: Qmp,
    uri: str,
    postcopy: bool,
    params: dict[str, int],
    progress: ProgressFn | None,
    timeout: float,
) -> MigrationTiming:
    timing = MigrationTiming(mode="stock", postcopy=postcopy)
    phase = Phase(progress)
    await _check_ready(src, dst)

    # 1. Capabilities on both sides (postcopy must be enabled on both before 'migrate').
    await _set_caps(src, dst, postcopy, pause=False)
    if params:
        await src.cmd("migrate-set-parameters", **params)

    # 2. Destination listens, source streams; postcopy switches once the stream is active.
    await start_migration(src, dst, uri, postcopy, timing, phase)
    watcher = asyncio.create_task(_watch_progress(src, phase))
    try:
        # 3. QEMU stops the source by itself when it converges; wait for the end.
        await _source_completed(src, timing, timeout)
        phase.enter("completed")
        first = await dst.wait_event(
            lambda e: e.name == "RESUME" or is_event("MIGRATION", status="completed")(e),
            60,
            what="destination RESUME",
        )
        if first.name != "RESUME":
            # Started with -S (e.g. netpass fell back to stock): QEMU waits for a `cont`.
            await dst.cmd("cont")
        resume = await dst.wait_event(is_event("RESUME"), 30, what="destination RESUME")
        await _dst_completed(dst)
    finally:
        watcher.cancel()

    # 4. Measurements.
    timing.dst_resume_ns = resume.t_ns
    await _measure(timing, src, dst)
    return timing


def _t(e: Event) -> int:
    return e.t_ns


def _fill_info(timing: MigrationTiming, info: dict[str, Any]) -> None:
    ram = info.get("ram", {})
    timing.qemu_downtime_ms = float(info["downtime"]) if "downtime" in info else None
    timing.total_time_ms = float(info["total-time"]) if "total-time" in info else None
    timing.setup_time_ms = float(info["setup-time"]) if "setup-time" in info else None
    timing.ram_transferred_bytes = int(ram["transferred"]) if "transferred" in ram else None
    timing.ram_total_bytes = int(ram["total"]) if "total" in ram else None
    # How much was left when QEMU stopped the VM: what the pause had to carry.
    timing.ram_downtime_bytes = int(ram["downtime-bytes"]) if "downtime-bytes" in ram else None


async def migrate(
    src_qmp: str,
    dst_qmp: str,
    uri: str,
    *,
    netpass: bool = True,
    postcopy: bool = False,
    downtime_ms: int | None = None,
    max_bandwidth: int | None = None,
    progress: ProgressFn | None = None,
    timeout: float = 300.0,
) -> MigrationTiming:
    """Migrate the VM behind SRC_QMP to the QEMU behind DST_QMP (`-incoming defer`, and `-S`
    with netpass) over URI; returns the measured timing, with the per-NIC netpass counters in
    `.netpass["nics"]`. NETPASS=False is QEMU's own switchover, measured the same way."""
    kw: dict[str, Any] = dict(
        postcopy=postcopy,
        downtime_ms=downtime_ms,
        max_bandwidth=max_bandwidth,
        progress=progress,
        timeout=timeout,
    )
    if netpass:
        return await migrate_netpass(src_qmp, dst_qmp, uri, **kw)
    return await migrate_stock(src_qmp, dst_qmp, uri, **kw)


async def used_at_stop(q: Qmp, nics: list[NicInfo]) -> list[int] | None:
    """Every NIC's used-idx while the source is stopped (QEMU answers once its migration
    thread lets go of the big lock, after the device state is out); None if the source runs
    again by then (the migration failed): that reading may count frames the resumed guest
    took. `query-status` goes right behind the reads, and a failed source only ever goes
    from stopped to running: not running then means not running during the reads."""
    *read, status = await asyncio.gather(
        *(used_idx(q, n) for n in nics), q.cmd("query-status")
    )  # fmt: skip
    return None if status["status"] == "running" else [int(u) for u in read]


async def stable_used(q: Qmp, nic: NicInfo) -> int:
    """The RX used-idx once it stops moving: frames QEMU read before the redirect may still
    wait in its queue for guest buffers, so only a settled count is a baseline."""
    last = await used_idx(q, nic)
    for _ in range(100):
        await asyncio.sleep(0.005)
        now = await used_idx(q, nic)
        if now == last:
            return now
        last = now
    raise DatapathError(f"{nic.nic_id}: RX used-idx never settled")


async def start_migration(
    src: Qmp,
    dst: Qmp,
    uri: str,
    postcopy: bool,
    timing: MigrationTiming,
    phase: Phase,
    before_postcopy: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Destination listens, source streams; postcopy switches as soon as the stream is active
    (an idle guest would otherwise converge in precopy before postcopy ever starts), after
    BEFORE_POSTCOPY has run."""
    await dst.cmd("migrate-incoming", uri=uri)
    phase.enter("precopy")
    timing.migrate_start_ns = time.time_ns()
    await src.cmd("migrate", uri=uri)
    if postcopy:
        await _wait_active(src)
        if before_postcopy is not None:
            await before_postcopy()
        timing.postcopy_start_ns = time.time_ns()
        await src.cmd("migrate-start-postcopy")
        phase.enter("postcopy")


async def wait_completed(src: Qmp, dst: Qmp, timing: MigrationTiming, timeout: float) -> None:
    """The source reports the end; in postcopy the destination finishes pulling pages later."""
    await _source_completed(src, timing, timeout)
    await _dst_completed(dst)


async def _source_completed(src: Qmp, timing: MigrationTiming, timeout: float) -> None:
    end = await src.wait_event(
        lambda e: e.name == "MIGRATION" and e.data.get("status") in FINAL_STATES,
        timeout,
        what="migration to finish",
    )
    if end.data["status"] != "completed":
        raise MigrationError(f"migration {end.data['status']}")
    timing.completed_ns = end.t_ns


# --- netpass mode ------------------------------------------------------------------------------


@dataclass
class Pair:
    src: SourceNic
    dst: DestNic


async def migrate_netpass(
    src_qmp: str,
    dst_qmp: str,
    uri: str,
    *,
    postcopy: bool = False,
    downtime_ms: int | None = None,
    max_bandwidth: int | None = None,
    progress: ProgressFn | None = None,
    timeout: float = 300.0,
    pause_before_switchover: bool = False,
    early_start: bool = True,
) -> MigrationTiming:
    """Migrate with the netpass switchover: no frame that reaches the source is lost.
    EARLY_START=False always starts the destination one `cont` after it has loaded."""
    params = _params(downtime_ms, max_bandwidth)
    async with _sessions(src_qmp, dst_qmp) as (src, dst):
        tl = NetpassTimeline(
            src, dst, uri, postcopy, params, progress, timeout, pause_before_switchover
        )
        tl.early_start = early_start
        with gc_frozen():  # no long garbage-collector pause in the timeline
            return await tl.run()


class NetpassTimeline:
    """The netpass switchover, one step after the other (see docs/design.md).

    A data-path failure never fails the migration: the migration goes on as a stock one, the
    frames netpass still held go back to the source VM (or are counted lost) and the error is
    reported in timing.netpass["error"].
    """

    def __init__(
        self,
        src: Qmp,
        dst: Qmp,
        uri: str,
        postcopy: bool,
        params: dict[str, int],
        progress: ProgressFn | None,
        timeout: float,
        pause_before_switchover: bool = False,
    ) -> None:
        self.src, self.dst, self.uri = src, dst, uri
        self.postcopy, self.params, self.progress, self.timeout = (
            postcopy,
            params,
            progress,
            timeout,
        )
        self.pause_before_switchover = pause_before_switchover
        self.timing = MigrationTiming(mode="netpass", postcopy=postcopy)
        self.pairs: list[Pair] = []
        self.error: str | None = None
        self.phase = Phase(progress)
        self.injected_ns: int | None = None  # when the last rescued frame went into the tap
        self.early_start = True  # may the destination get `cont` while it loads (step 8)
        self.start = DestStart(src, dst, postcopy)

    def _fail_datapath(self, e: BaseException) -> None:
        if self.error is None:
            self.error = str(e)

    async def run(self) -> MigrationTiming:
        await _check_ready(self.src, self.dst)
        await self._prepare()
        failed: MigrationError | None = None
        try:
            await self._capture_on()
            await self._start_migration()
            watcher = asyncio.create_task(self._watch())
            try:
                if await self._switchover():
                    await self._deliver()
                    await self._finish()
                else:
                    failed = await self._give_back()
            finally:
                watcher.cancel()
        finally:
            await self._cleanup()
            await self._report()
        if failed is not None:
            raise failed
        return self.timing

    # 1. Prepare: discover NICs and taps, create what must exist before traffic matters.
    async def _prepare(self) -> None:
        svm, dvm = await discover(self.src), await discover(self.dst)
        if not qemu_has_flag(dvm.pid, "-S"):
            raise UsageError(
                "destination QEMU was not started with -S: netpass must start it itself, "
                "after the rescued frames are ready"
            )
        by_mac = {n.mac: n for n in dvm.nics}
        for slot, n in enumerate(svm.nics):
            d = by_mac.get(n.mac)
            if d is None:
                raise UsageError(f"destination has no NIC with MAC {n.mac} (source {n.nic_id})")
            self.pairs.append(
                Pair(SourceNic(n, svm.pid, svm.netns, slot), DestNic(d, dvm.pid, dvm.netns))
            )
        try:
            for p in self.pairs:
                await asyncio.to_thread(p.dst.prepare)
                await asyncio.to_thread(p.src.prepare)
        except (DatapathError, HostError) as e:
            await self._cleanup()
            raise DatapathError(f"netpass could not prepare the data path: {e}") from e
        await _set_caps(self.src, self.dst, self.postcopy, self.pause_before_switchover)
        if self.params:
            await self.src.cmd("migrate-set-parameters", **self.params)
        await self.start.decide(None if self.early_start else "disabled (--late-start)")

    # 2. Capture on: from here every frame for the guest passes through netpass.
    async def _capture_on(self) -> None:
        try:
            for p in self.pairs:
                await asyncio.to_thread(p.src.capture_on)
            for p in self.pairs:
                if not await asyncio.to_thread(p.src.wait_tap_empty):
                    raise DatapathError(f"source tap {p.src.nic.tap} did not empty")
                p.src.start_relay(await self._stable_used(p))
        except DatapathError as e:
            self._fail_datapath(e)
            for p in self.pairs:
                try:
                    await asyncio.to_thread(p.src.give_back, None)
                except DatapathError as e2:
                    self._fail_datapath(e2)

    async def _stable_used(self, p: Pair) -> int:
        return await stable_used(self.src, p.src.nic)

    async def _start_migration(self) -> None:
        await start_migration(
            self.src, self.dst, self.uri, self.postcopy, self.timing, self.phase,
            self._arm_destination,
        )  # fmt: skip

    async def _arm_destination(self) -> None:
        """Postcopy: netpass itself says when the source stops, so the destination is readied
        before: hold closed (floods from here on reach the destination, not the source guest)
        and the early `cont`, which QEMU runs at once (it is not loading device state yet) and
        which makes it start the VM as soon as it has it, as a stock destination would."""
        await self._flush_destination()
        await self.start.cont_now()

    async def _watch(self) -> None:
        """Progress, and used-idx readings often enough to unwrap the 16-bit counter."""
        while True:
            info = await self.src.cmd("query-migrate")
            self.phase.poll(info)
            if info.get("status") in ("active", "postcopy-active") and self.phase.source_runs:
                for p in self.pairs:
                    with contextlib.suppress(MigrationError):
                        p.src.observe_used(await used_idx(self.src, p.src.nic))
            await asyncio.sleep(0.1)

    # 3. Switchover: QEMU stops the source by itself when it converges (or when postcopy
    #    starts). From the STOP on, the guest's used-idx is frozen, so the accounting can run
    #    while QEMU sends the device state; nothing netpass does delays the destination's start
    #    beyond one `cont`.
    async def _switchover(self) -> bool:
        ev = await self.src.wait_event(
            lambda e: (
                e.name == "STOP"
                or (e.name == "MIGRATION" and e.data.get("status") in ("failed", "cancelled"))
            ),
            self.timeout,
            what="the source to stop",
        )
        if ev.name != "STOP":
            return False
        self.phase.enter("switch")
        self.start.source_stopped()
        for p in self.pairs:
            # A stopped guest takes nothing more; its tap queue is emptied now, while QEMU
            # saves the device state, so a failed migration gives back in order.
            try:
                p.src.drain_at_stop()
            except DatapathError as e:
                self._fail_datapath(e)
        # Postcopy closed the hold before migrate-start-postcopy (_arm_destination).
        resumed = asyncio.Event()
        early: list[asyncio.Task[None]] = []
        flushed = asyncio.create_task(
            asyncio.sleep(0) if self.postcopy else self._flush_destination()
        )
        accounted = asyncio.create_task(self._account())
        try:
            if self.pause_before_switchover and not await self._continue_after_pause():
                return False

            async def ready() -> None:
                # The hold is closed and the owed frames are known before the destination may
                # run: frames reaching its tap from then on wait behind the rescued ones.
                await asyncio.gather(flushed, accounted)
                early.append(asyncio.create_task(self._inject_early(resumed)))

            started = await self.start.run(ready, self.timeout)
        finally:
            resumed.set()  # ends the early injection, whatever happened
            await asyncio.gather(flushed, accounted, *early)
        if not started:
            return False
        self.timing.dst_resume_ns = (
            await self.dst.wait_event(is_event("RESUME"), 30, what="destination RESUME")
        ).t_ns
        return True

    async def _inject_early(self, resumed: asyncio.Event) -> None:
        """Owed frames into the destination tap while the destination still loads: QEMU reads
        a tap only while its VM runs, so they wait there, in order, and the guest has them the
        moment it runs (they stay the source's to give back until then)."""
        while not resumed.is_set():
            await self._move_owed(early=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(resumed.wait(), EARLY_POLL_S)

    async def _move_owed(self, early: bool = False) -> int:
        """Inject the owed frames captured so far (EARLY: only what fits the tap queue of a
        VM that does not run yet); how many."""
        moved = 0
        for p in self.pairs:
            try:
                frames = p.src.take(min(256, p.dst.room_before_start()) if early else 256)
                if frames:
                    await asyncio.to_thread(p.dst.inject, frames)
                    self.injected_ns = time.time_ns()
                    moved += len(frames)
            except DatapathError as e:
                self._fail_datapath(e)
        return moved

    async def _continue_after_pause(self) -> bool:
        """With pause-before-switchover, QEMU waits in pre-switchover (the management layer's
        last chance to cancel) until migrate-continue."""
        ev = await self.src.wait_event(
            lambda e: (
                e.name == "MIGRATION"
                and e.data.get("status") in ("pre-switchover", "failed", "cancelled")
            ),
            self.timeout,
            what="pre-switchover",
        )
        if ev.data["status"] != "pre-switchover":
            return False
        await self.src.cmd("migrate-continue", state="pre-switchover")
        return True

    async def _account(self) -> None:
        """Split relayed frames into received and owed (the query waits for QEMU's big lock,
        which its migration thread holds until the device state is out)."""
        try:
            used = await used_at_stop(self.src, [p.src.nic for p in self.pairs])
            if used is None:
                return  # the source runs again: the give-back reads the used-idx then
            for p, u in zip(self.pairs, used, strict=True):
                p.src.account(u)  # the tap was drained at the STOP, and nothing entered since
        except (DatapathError, MigrationError) as e:
            self._fail_datapath(e)

    async def _flush_destination(self) -> None:
        """Close the destination hold and drop what queued before (floods the source has)."""
        try:
            for p in self.pairs:
                await asyncio.to_thread(p.dst.close_and_flush)
                p.src.set_flush_point()
        except DatapathError as e:
            self._fail_datapath(e)

    # 4. Destination: rescued frames first (bypass skips the closed hold), then the hold opens.
    async def _deliver(self) -> None:
        self.phase.enter("deliver")
        for p in self.pairs:
            p.src.dest_running()
            p.dst.set_catchup(catchup_for(p.src.arrival_per_ms()))
        deadline = time.monotonic() + RESCUE_DEADLINE_S
        while True:
            if await self._move_owed():
                continue
            if all(p.src.quiet_for() >= QUIET_S for p in self.pairs):
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.001)
        for p in self.pairs:
            try:
                p.src.counters.held = await asyncio.to_thread(p.dst.release)
            except DatapathError as e:
                self._fail_datapath(e)

    async def _finish(self) -> None:
        await wait_completed(self.src, self.dst, self.timing, self.timeout)
        self.phase.enter("completed")
        for p in self.pairs:
            c = p.src.counters
            c.injected = p.dst.injected
            # Rescued frames still queued are lost (the source tap outlived the deadline).
            if c.rescued > c.injected:
                c.drop("left after the delivery deadline", c.rescued - c.injected)

    # 5. Failure or cancel after capture-on: the source VM runs again, frames go back to it.
    async def _give_back(self) -> MigrationError:
        self.phase.enter("give-back")
        if await _status(self.src) != "running":
            await self.src.wait_event(is_event("RESUME"), 30, what="source RESUME after failure")
        for p in self.pairs:
            try:
                await asyncio.to_thread(p.src.wait_tap_empty)
                await asyncio.sleep(0.02)
                u = await used_idx(self.src, p.src.nic)
                await asyncio.to_thread(p.src.give_back, u)
            except (DatapathError, MigrationError) as e:
                self._fail_datapath(e)
        end = next(e for e in self.src.events if e.name == "MIGRATION" and
                   e.data.get("status") in ("failed", "cancelled"))  # fmt: skip
        return MigrationError(
            f"migration {end.data['status']}; the source VM runs again and got back "
            f"{sum(p.src.counters.returned for p in self.pairs)} frames netpass held"
        )

    async def _cleanup(self) -> None:
        # pyroute2's synchronous API cannot run inside the event loop's thread.
        for p in self.pairs:
            for side in (p.src, p.dst):
                try:
                    await asyncio.to_thread(side.close)
                except (DatapathError, OSError) as e:
                    self._fail_datapath(e)

    async def _report(self) -> None:
        t = self.timing
        await _measure(t, self.src, self.dst)
        nics = [p.src.counters.to_dict() for p in self.pairs]
        flat: dict[str, object] = {}
        for key in ("captured", "relayed", "consumed", "drained", "rescued", "injected",
                    "returned", "held"):  # fmt: skip
            flat[key] = sum(int(n[key]) for n in nics)
        flat["dropped"] = sum(sum(n["dropped"].values()) for n in nics)
        flat["flood discarded at destination"] = sum(p.dst.flood_discarded for p in self.pairs)
        if self.injected_ns is not None and t.dst_resume_ns:
            # 0: every rescued frame was in the tap before the destination ran.
            flat["rescued injected after RESUME (ms)"] = round(
                max(0, self.injected_ns - t.dst_resume_ns) / 1e6, 2
            )
        flat["accounting balanced"] = all(p.src.counters.balanced() for p in self.pairs)
        flat.update(self.start.report())
        if self.error:
            flat["error"] = self.error
        t.netpass = {**flat, "nics": nics}
