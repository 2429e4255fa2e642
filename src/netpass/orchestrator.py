"""The migration timeline, top to bottom.

Stock mode is QEMU's own switchover, measured: source STOP -> destination RESUME from QMP event
timestamps, QEMU's reported downtime (re-queried: it reads 0 right at completion), total time and
bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netpass.errors import MigrationError, UsageError
from netpass.qmp import Event, Qmp, is_event
from netpass.results import MigrationTiming

FINAL_STATES = ("completed", "failed", "cancelled")


@dataclass
class Progress:
    phase: str
    status: str = ""
    ram_remaining: int = 0
    ram_total: int = 0
    ram_transferred: int = 0


ProgressFn = Callable[[Progress], None]


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


async def _final_info(src: Qmp) -> dict[str, Any]:
    # downtime/total-time can read 0 just as the status turns 'completed': ask again.
    info: dict[str, Any] = {}
    for _ in range(20):
        info = await src.cmd("query-migrate")
        if info.get("downtime") and info.get("total-time"):
            break
        await asyncio.sleep(0.05)
    return info


async def _watch_progress(src: Qmp, progress: ProgressFn | None, phase: list[str]) -> None:
    while True:
        info = await src.cmd("query-migrate")
        ram = info.get("ram", {})
        if progress is not None:
            progress(
                Progress(
                    phase[0], str(info.get("status", "")), int(ram.get("remaining", 0)),
                    int(ram.get("total", 0)), int(ram.get("transferred", 0)),
                )
            )  # fmt: skip
        await asyncio.sleep(0.1)


async def migrate_stock(
    src_qmp: str,
    dst_qmp: str,
    uri: str,
    *,
    postcopy: bool = False,
    downtime_ms: int | None = None,
    progress: ProgressFn | None = None,
    timeout: float = 300.0,
) -> MigrationTiming:
    """Migrate with QEMU's own switchover and measure it."""
    src, dst = Qmp("src", src_qmp), Qmp("dst", dst_qmp)
    await src.connect()
    try:
        await dst.connect()
        return await _stock_timeline(src, dst, uri, postcopy, downtime_ms, progress, timeout)
    finally:
        await src.close()
        await dst.close()


async def _stock_timeline(
    src: Qmp,
    dst: Qmp,
    uri: str,
    postcopy: bool,
    downtime_ms: int | None,
    progress: ProgressFn | None,
    timeout: float,
) -> MigrationTiming:
    timing = MigrationTiming(mode="stock", postcopy=postcopy)
    phase = ["prepare"]
    await _check_ready(src, dst)

    # 1. Capabilities on both sides (postcopy must be enabled on both before 'migrate').
    caps = [{"capability": "events", "state": True}]
    if postcopy:
        caps.append({"capability": "postcopy-ram", "state": True})
    for q in (src, dst):
        await q.cmd("migrate-set-capabilities", capabilities=caps)
    if downtime_ms is not None:
        await src.cmd("migrate-set-parameters", **{"downtime-limit": downtime_ms})

    # 2. Destination listens, source starts streaming.
    await dst.cmd("migrate-incoming", uri=uri)
    phase[0] = "precopy"
    timing.migrate_start_ns = time.time_ns()
    await src.cmd("migrate", uri=uri)
    watcher = asyncio.create_task(_watch_progress(src, progress, phase))
    try:
        # 3. Postcopy: switch as soon as the stream is active (an idle guest would otherwise
        #    converge in precopy before postcopy ever starts).
        if postcopy:
            await src.wait_event(is_event("MIGRATION", status="active"), 30, what="active")
            timing.postcopy_start_ns = time.time_ns()
            await src.cmd("migrate-start-postcopy")
            phase[0] = "postcopy"

        # 4. QEMU stops the source by itself when it converges; wait for the end.
        end = await src.wait_event(
            lambda e: e.name == "MIGRATION" and e.data.get("status") in FINAL_STATES,
            timeout, what="migration to finish",
        )  # fmt: skip
        if end.data["status"] != "completed":
            raise MigrationError(f"migration {end.data['status']}")
        timing.completed_ns = end.t_ns
        phase[0] = "completed"
        resume = await dst.wait_event(is_event("RESUME"), 30, what="destination RESUME")
    finally:
        watcher.cancel()

    # 5. Measurements.
    stop = next((e for e in src.events if e.name == "STOP"), None)
    timing.src_stop_ns = stop.t_ns if stop else None
    timing.dst_resume_ns = resume.t_ns
    if stop is not None:
        timing.true_pause_ms = (resume.t_ns - stop.t_ns) / 1e6
    info = await _final_info(src)
    _fill_info(timing, info)
    timing.events = [e.to_dict() for e in sorted([*src.events, *dst.events], key=_t)]
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
