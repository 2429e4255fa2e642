"""netpass switchover end to end on real QEMU, taps, namespaces and tc."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from conftest import fails_under_probe, needs_root, run_cli, tc_clean
from netpass import lab, trial, vm
from netpass.analysis import ProbeStats, analyze
from netpass.cli import lab_driver
from netpass.datapath import tc
from netpass.discovery import discover, used_idx
from netpass.errors import MigrationError, UsageError
from netpass.orchestrator import migrate_netpass
from netpass.qmp import Qmp
from netpass.switchover import SourceNic

pytestmark = [needs_root, pytest.mark.e2e]


def _ping_ok(st: lab.LabState, seconds: float = 0.5) -> None:
    with trial.probe(st, 1000) as finish:
        time.sleep(seconds)
        stats = analyze(finish())
    assert stats.sent > 100 and stats.received == stats.sent


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_lossless_switchover(lab_up: lab.LabState, postcopy: bool) -> None:
    st = lab_up
    lab.ensure_incoming(st, paused=True)
    run = trial.run_trial(st, "np", 1000, lab_driver("netpass", postcopy, None, None))
    s, t = run.stats, run.timing
    assert t.netpass.get("error") is None, t.netpass
    assert s.sent > 1000 and s.lost == 0 and s.reordered == 0 and s.duplicates == 0
    n = t.netpass
    assert n["accounting balanced"] is True
    assert n["rescued"] > 0 and n["injected"] == n["rescued"]  # the pause had traffic to rescue
    assert n["consumed"] + n["injected"] + n["returned"] + n["dropped"] == n["captured"]
    assert t.true_pause_ms is not None and t.true_pause_ms > 0
    # No disk: `cont` goes to the destination as soon as its hold is closed (design step 8).
    assert str(n["destination start"]).startswith(("by QEMU once loaded", "cont queued")), n
    # Postcopy: netpass chooses when the source stops, so `cont` goes out before that.
    cont_ms = n["cont sent after STOP seen (ms)"]
    assert cont_ms < 0 if postcopy else 0 <= cont_ms < t.true_pause_ms
    tc_clean(st)
    _ping_ok(st)


def _qmp(path: str, *cmds: tuple[str, dict[str, Any]]) -> list[Any]:
    async def go() -> list[Any]:
        c = Qmp("test", path)
        await c.connect()
        try:
            return [await c.cmd(name, **args) for name, args in cmds]
        finally:
            await c.close()

    return asyncio.run(go())


def test_writable_block_node_means_cont_after_loading(lab_up: lab.LabState) -> None:
    """An early `cont` would activate the destination's block nodes while the source may still
    write to them: with a writable one netpass starts the destination only once it has loaded,
    and says so. Nothing is lost either way."""
    st = lab_up
    lab.ensure_incoming(st, paused=True)
    node = {"driver": "null-co", "node-name": "npdisk0", "read-only": False}
    _qmp(st.status()["destination"]["qmp"], ("blockdev-add", node))
    run = trial.run_trial(st, "np-disk", 1000, lab_driver("netpass", False, None, None))
    n, s = run.timing.netpass, run.stats
    assert n.get("error") is None, n
    assert n["destination start"] == (
        "cont after loading: writable block devices (npdisk0): started after loading"
    ), n
    assert s.lost == 0 and s.reordered == 0 and s.duplicates == 0
    tc_clean(st)


def _sockets(st: lab.LabState) -> tuple[str, str, str]:
    s = st.status()
    return s["source"]["qmp"], s["destination"]["qmp"], s["migration_uri"]


def _src_running(st: lab.LabState) -> str:
    return str(_qmp(st.status()["source"]["qmp"], ("query-status", {}))[0]["status"])


def test_cancel_during_switchover_gives_frames_back(
    lab_up: lab.LabState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """migrate_cancel while the source waits in pre-switchover (capture on, VM stopped)."""
    st = lab_up
    lab.ensure_incoming(st, paused=True)
    real_cmd = Qmp.cmd

    async def cmd(self: Qmp, name: str, **args: Any) -> Any:
        if name == "migrate-continue":
            await asyncio.sleep(0.05)  # frames pile up at the stopped source meanwhile
            return await real_cmd(self, "migrate_cancel")
        return await real_cmd(self, name, **args)

    monkeypatch.setattr(Qmp, "cmd", cmd)
    src, dst, uri = _sockets(st)
    with trial.probe(st, 1000) as finish:
        time.sleep(0.5)
        with pytest.raises(MigrationError, match="cancelled; the source VM runs again"):
            asyncio.run(
                migrate_netpass(src, dst, uri, max_bandwidth=1 << 30, pause_before_switchover=True)
            )
        time.sleep(0.5)
        stats = analyze(finish())
    monkeypatch.undo()
    assert _src_running(st) == "running"
    assert stats.lost == 0 and stats.duplicates == 0
    tc_clean(st)
    _ping_ok(st)


def test_destination_killed_mid_migration(lab_up: lab.LabState) -> None:
    st = lab_up
    dst_inst = lab.ensure_incoming(st, paused=True)
    src, dst, uri = _sockets(st)

    async def go() -> None:
        task = asyncio.create_task(migrate_netpass(src, dst, uri, max_bandwidth=20_000_000))
        await asyncio.sleep(1.5)  # capture is on, RAM is streaming slowly
        vm.kill(dst_inst.pid, dst_inst.name)
        await task

    stats = fails_under_probe(st, go, "failed; the source VM runs again")
    lab.stop_instance(st, dst_inst)
    assert _src_running(st) == "running"
    assert stats.lost == 0 and stats.duplicates == 0
    tc_clean(st)
    _ping_ok(st)


def test_destination_exits_after_the_source_completed(
    lab_up: lab.LabState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination QEMU dies after the source sent everything (here: as netpass reads the
    source's used-idx at the stop, which QEMU answers once the device state is out, before
    netpass lets the destination run). The VM is lost with it; netpass says so at once (not
    after its 300 s timeout), leaves no tc object, and `cont` on the source revives it."""
    st = lab_up
    dst_inst = lab.ensure_incoming(st, paused=True)
    src, dst, uri = _sockets(st)
    real_account = SourceNic.account
    killed: list[float] = []

    def account(self: SourceNic, used_idx_at_stop: int) -> int:
        k = real_account(self, used_idx_at_stop)
        if not killed:
            killed.append(time.monotonic())
            vm.kill(dst_inst.pid, dst_inst.name)
        return k

    monkeypatch.setattr(SourceNic, "account", account)
    try:
        with trial.probe(st, 1000) as finish:
            time.sleep(0.3)
            with pytest.raises(MigrationError, match="destination QEMU exited before it ran"):
                asyncio.run(migrate_netpass(src, dst, uri))
            failed_after = time.monotonic() - killed[0]
            finish()
        monkeypatch.undo()
        assert failed_after < 5, failed_after
        assert _src_running(st) == "postmigrate"
        tc_clean(st)
    finally:
        monkeypatch.undo()
        lab.stop_instance(st, dst_inst)
        if _src_running(st) == "postmigrate":  # the next tests need the VM running
            _qmp(st.status()["source"]["qmp"], ("cont", {}))
    _ping_ok(st)


def test_sigkill_then_cleanup_restores_the_tap(lab_up: lab.LabState) -> None:
    st = lab_up
    inc = lab.ensure_incoming(st, paused=True)
    src, dst, uri = _sockets(st)
    proc = subprocess.Popen(
        [sys.executable, "-m", "netpass.cli", "migrate", "--src-qmp", src, "--dst-qmp", dst,
         "--uri", uri, "--max-bandwidth", "10000000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    src_inst = st.instance(st.vm_host, incoming=False)
    assert src_inst is not None
    tap, ns = src_inst.taps[0], st.host_ns(src_inst.host)
    deadline = time.monotonic() + 20
    while not any(p >= tc.PRIO_BASE for p in tc.egress_filter_prios(tap, netns=ns)):
        assert time.monotonic() < deadline, "capture never switched on"
        time.sleep(0.01)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tc.egress_filter_prios(tap, netns=ns)  # the tap is black-holed now
    r = run_cli("cleanup", "--qmp", src)
    assert r.returncode == 0, r.stderr
    assert "deleted egress filter" in r.stdout
    tc_clean(st)
    lab.stop_instance(st, inc)
    _ping_ok(st)


def test_bad_input_leaves_vm_untouched(lab_up: lab.LabState) -> None:
    st = lab_up
    # Destination not started with -S.
    lab.ensure_incoming(st, paused=False)
    src, dst, uri = _sockets(st)
    with pytest.raises(UsageError, match="not started with -S"):
        asyncio.run(migrate_netpass(src, dst, uri))
    # Wrong socket path.
    r = run_cli("migrate", "--src-qmp", "/nonexistent.qmp", "--dst-qmp", dst, "--uri", uri)
    assert r.returncode == 1 and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # The same socket twice: QEMU serves one QMP client at a time.
    r = run_cli("migrate", "--src-qmp", src, "--dst-qmp", src, "--uri", uri)
    assert r.returncode == 1 and "is another connected?" in r.stderr
    # A migration already running on the source.
    inc = lab.ensure_incoming(st, paused=True)
    src, dst, uri = _sockets(st)

    async def start_slow() -> None:
        c = Qmp("src", src)
        await c.connect()
        await c.cmd("migrate-set-parameters", **{"max-bandwidth": 1_000_000})
        await c.cmd("migrate", uri="exec:cat > /dev/null")  # slow: 1 MB/s
        await c.close()

    async def cancel() -> None:
        c = Qmp("src", src)
        await c.connect()
        await c.cmd("migrate_cancel")
        await c.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
        await c.close()

    asyncio.run(start_slow())
    try:
        r = run_cli("migrate", "--src-qmp", src, "--dst-qmp", dst, "--uri", uri)
        assert r.returncode == 1 and "already running on the source" in r.stderr
    finally:
        asyncio.run(cancel())
    lab.stop_instance(st, inc)
    assert _src_running(st) == "running"
    tc_clean(st)
    _ping_ok(st)


def test_setup_and_teardown_lose_nothing(lab_up: lab.LabState) -> None:
    """Capture on, relay, capture off under a 1000 pps probe, no migration: nothing lost."""

    async def relay(nic: SourceNic) -> None:
        await asyncio.sleep(1.0)

    nic, stats = _relay_cycle(lab_up, relay)
    assert nic.counters.relayed > 500
    assert stats.lost == 0 and stats.duplicates == 0 and stats.reordered == 0
    tc_clean(lab_up)


def test_relay_pauses_at_the_stop_and_gives_back_in_order(lab_up: lab.LabState) -> None:
    """After stop_relay the relay thread leaves new frames in the capture socket (it does not
    wake during the pause); give_back still returns every one of them, in order."""
    seen: list[int] = []

    async def relay_then_stop(nic: SourceNic) -> None:
        await asyncio.sleep(0.5)
        nic.stop_relay()
        await asyncio.sleep(0.05)  # a read in progress ends
        seen.append(nic.counters.captured)
        await asyncio.sleep(0.3)  # 300 frames at 1000 pps, left in the socket
        seen.append(nic.counters.captured)

    nic, stats = _relay_cycle(lab_up, relay_then_stop)
    assert seen[0] > 300 and seen[1] == seen[0], seen  # nothing read while paused
    assert nic.counters.returned >= 250, nic.counters.to_dict()
    assert stats.lost == 0 and stats.duplicates == 0 and stats.reordered == 0, stats
    tc_clean(lab_up)


def _relay_cycle(
    st: lab.LabState, middle: Callable[[SourceNic], Awaitable[None]]
) -> tuple[SourceNic, ProbeStats]:
    """Under a 1000 pps probe, no migration: capture on and relay the VM's first NIC (from a
    settled used-idx), run MIDDLE, give back, capture off."""

    async def cycle() -> SourceNic:
        q = Qmp("src", st.status()["source"]["qmp"])
        await q.connect()
        try:
            info = await discover(q)
            nic = SourceNic(info.nics[0], info.pid, info.netns, 0)
            await asyncio.to_thread(nic.prepare)
            await asyncio.to_thread(nic.capture_on)
            assert await asyncio.to_thread(nic.wait_tap_empty)
            nic.start_relay(await used_idx(q, nic.nic))
            await middle(nic)
            await asyncio.to_thread(nic.give_back, None)
            await asyncio.to_thread(nic.close)
            return nic
        finally:
            await q.close()

    with trial.probe(st, 1000) as finish:
        time.sleep(0.5)
        nic = asyncio.run(cycle())
        time.sleep(0.5)
        return nic, analyze(finish())
