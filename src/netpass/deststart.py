"""When the destination VM starts (docs/design.md, step 8), for both netpass timelines.

Early start: `cont` goes to the destination as soon as netpass is ready for it to run (its hold
closed, the owed frames known). QEMU 7.2+ takes a `cont` during `inmigrate` as "start by
yourself once loaded", and one that arrives while it loads the final device state waits in its
QMP queue until the load ends: either way the VM starts when a stock destination would. Late
start (writable block nodes, `--late-start`, an agent without ACK(HOLD), or QEMU refused): `cont`
once the destination has loaded, one event and one QMP round trip later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from netpass.errors import MigrationError
from netpass.qmp import Event, Qmp, is_event

Ready = Callable[[], Awaitable[None]]


def src_failed(e: Event) -> bool:
    return e.name == "MIGRATION" and e.data.get("status") in ("failed", "cancelled")


class DestStart:
    def __init__(self, src: Qmp, dst: Qmp, postcopy: bool) -> None:
        self.src, self.dst, self.postcopy = src, dst, postcopy
        self.refusal: str | None = "not decided"  # why not early; None: early
        self.early: str | None = None  # start_early's answer once the early `cont` went out
        self.cont_t: float | None = None  # monotonic time the `cont` went out
        self.stop_t = 0.0  # monotonic time netpass saw the source's STOP
        self._readied = False

    def source_stopped(self) -> None:
        self.stop_t = time.monotonic()

    async def decide(self, why_not: str | None = None) -> None:
        """Early unless WHY_NOT (the caller's reason) or the destination's block nodes say no."""
        self.refusal = why_not or await early_start_refusal(self.dst)

    async def cont_now(self) -> None:
        """The early `cont`, if allowed and not sent yet (postcopy: before the source stops)."""
        if self.refusal is None and self.early is None:
            self.cont_t = time.monotonic()
            self.early = await start_early(self.dst)

    async def run(self, ready: Ready, timeout: float) -> bool:
        """Start the destination, READY done first; False if the migration failed before."""
        if self.refusal is None and self.early is None:
            await self._ready(ready)
            await self.cont_now()
        if self.early is not None:
            return await dst_resumed(self.src, self.dst, timeout)
        if not await dst_loaded(self.src, self.dst, self.postcopy, timeout):
            return False
        await self._ready(ready)
        self.cont_t = time.monotonic()
        try:
            await self.dst.cmd("cont")
        except MigrationError:
            if not self.dst.gone:
                raise
            return await _failed_after_dst_exit(self.src, self.dst)
        return True

    async def _ready(self, ready: Ready) -> None:
        if not self._readied:
            self._readied = True
            await ready()

    def report(self) -> dict[str, object]:
        out: dict[str, object] = {"destination start": self._note()}
        if self.cont_t is not None:
            # Negative in postcopy: netpass readied the destination before the source stopped.
            out["cont sent after STOP seen (ms)"] = round((self.cont_t - self.stop_t) * 1e3, 2)
        return out

    def _note(self) -> str:
        if self.early == "armed":
            return "by QEMU once loaded (cont sent while it loaded)"
        if self.early == "started":
            # QEMU runs no QMP command while it loads the final device state: the `cont`
            # waited in its queue and ran right after the load.
            return "cont queued during the load, run as it ended"
        return f"cont after loading: {self.refusal or 'the destination refused the early cont'}"


async def early_start_refusal(dst: Qmp) -> str | None:
    """None when `cont` may go to the destination while it still loads the VM, else why not.

    That `cont` activates every block node at once, while the source may still write to them
    (the destination would cache stale image metadata): only safe when no node is writable.
    After a normal load QEMU activates them only once the source has stopped.
    """
    nodes = await dst.cmd("query-named-block-nodes")
    writable = sorted({str(n.get("node-name") or "?") for n in nodes if not n.get("ro", False)})
    for b in await dst.cmd("query-block"):
        ins = b.get("inserted")
        if ins and not ins.get("ro", False):
            writable.append(str(b.get("qdev") or b.get("device") or "?"))
    if writable:
        return f"writable block devices ({', '.join(writable[:4])}): started after loading"
    return None


async def start_early(dst: Qmp) -> str | None:
    """Send the early `cont`: 'armed' if QEMU will start the VM once loaded, 'started' if it
    had loaded already; None if it refused (or is gone): then `cont` goes after the load."""
    try:
        await dst.cmd("cont")
    except MigrationError:
        return None
    # A loaded VM starts inside the command, so its RESUME comes before the reply.
    return "started" if any(e.name == "RESUME" for e in dst.events) else "armed"


async def dst_resumed(src: Qmp, dst: Qmp, timeout: float) -> bool:
    """True once the destination runs (RESUME); False if the migration failed first."""
    what = "destination RESUME"
    tasks = [
        asyncio.create_task(dst.wait_event(is_event("RESUME"), timeout, what=what)),
        asyncio.create_task(src.wait_event(src_failed, timeout, what=what)),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            if t in done and t.exception() is None:
                return t.result().name == "RESUME"
        if dst.gone:
            return await _failed_after_dst_exit(src, dst)
        raise next(e for t in tasks if t in done and (e := t.exception()) is not None)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def dst_loaded(src: Qmp, dst: Qmp, postcopy: bool, timeout: float) -> bool:
    """True once the destination holds the loaded VM, paused (-S); False if the migration
    failed (a failed incoming QEMU exits, so the source reports 'failed')."""
    failed = asyncio.create_task(src.wait_event(src_failed, timeout))
    loaded = asyncio.create_task(
        _dst_postcopy_paused(dst) if postcopy else _dst_precopy_done(dst, timeout)
    )
    try:
        done, _ = await asyncio.wait(
            {failed, loaded}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for t in (failed, loaded):
            t.cancel()
        await asyncio.gather(failed, loaded, return_exceptions=True)
    if failed in done and not failed.cancelled() and failed.exception() is None:
        return False
    if loaded in done and loaded.exception() is None:
        return True
    if failed in done or loaded in done:
        # The destination's QMP went away: a failed incoming QEMU exits; the source says why.
        return await _failed_after_dst_exit(src, dst)
    raise MigrationError("destination did not finish loading the VM")


async def _failed_after_dst_exit(src: Qmp, dst: Qmp) -> bool:
    """The destination QEMU exited (or its QMP failed) before running the VM. A failed
    incoming QEMU exits: the source then reports 'failed' (False: give the frames back). If
    the source completed instead, the VM is lost with the destination: say so now."""
    completed = is_event("MIGRATION", status="completed")
    with contextlib.suppress(MigrationError):  # its QMP may be gone too: then it says nothing
        end = await src.wait_event(
            lambda e: completed(e) or src_failed(e), 10, what="the source's outcome"
        )
        if src_failed(end):
            return False
    if not dst.gone:
        raise MigrationError("destination did not finish loading the VM")
    raise MigrationError(
        "the destination QEMU exited before it ran the VM, after the source had sent "
        "everything (the source is paused in 'postmigrate'; `cont` on it revives the VM)"
    )


async def _dst_precopy_done(dst: Qmp, timeout: float) -> None:
    # The incoming side reports 'completed' once the VM is loaded and paused (-S); waiting on
    # the event (not polling) keeps `cont` one QMP round trip behind it.
    await dst.wait_event(is_event("MIGRATION", status="completed"), timeout, what="destination")


async def _dst_postcopy_paused(dst: Qmp) -> None:
    # Postcopy: 'completed' only comes once every page is there; the VM is loaded (and paused,
    # -S) long before, and QEMU announces that with no event: poll.
    while (await dst.cmd("query-status"))["status"] != "paused":
        await asyncio.sleep(0.0005)
