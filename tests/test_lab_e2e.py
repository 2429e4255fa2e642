"""End to end on real QEMU (TCG) in real namespaces: lab, probe, stock migrations, teardown."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from conftest import leftovers, needs_root, run_cli
from netpass import bench, lab, trial, vm
from netpass.analysis import analyze
from netpass.cli import lab_driver

pytestmark = [needs_root, pytest.mark.e2e]


def _ping(st: lab.LabState, seconds: float = 1.0, rate: int = 1000) -> tuple[int, int]:
    import time

    with trial.probe(st, rate) as finish:
        time.sleep(seconds)
        data = finish()
    stats = analyze(data)
    return stats.sent, stats.received


def test_vm_answers_pings(lab_up: lab.LabState) -> None:
    sent, received = _ping(lab_up)
    assert sent > 500
    assert received == sent


def test_status_json_has_what_tools_need(lab_up: lab.LabState) -> None:
    r = run_cli("lab", "status", "--name", lab_up.name, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["namespaces"]["client"] == f"{lab_up.name}-cli"
    assert s["vm"]["ip"] == ["10.77.0.100"] and s["vm"]["mac"] == ["52:54:00:4e:50:01"]
    assert s["source"]["alive"] and s["destination"]["alive"]
    assert os.path.exists(s["source"]["qmp"]) and s["source"]["taps"]
    assert s["destination"]["incoming"] is True


def test_waiting_destination_has_its_guest_ram_faulted_in(lab_up: lab.LabState) -> None:
    """-mem-prealloc: the incoming QEMU does not fault RAM in while it loads (the pause)."""
    dst = lab_up.instance("b" if lab_up.vm_host == "a" else "a", incoming=True)
    assert dst is not None
    status = Path(f"/proc/{dst.pid}/status").read_text()
    rss_kib = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:")))
    assert rss_kib >= 128 * 1024  # the lab guest's -m 128, all resident before any migration


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_stock_migration(lab_up: lab.LabState, postcopy: bool) -> None:
    st = lab_up
    before = st.vm_host
    lab.ensure_incoming(st, paused=False)
    run = trial.run_trial(st, "t", 1000, lab_driver("stock", postcopy, None, None))
    t, s = run.timing, run.stats
    assert t.src_stop_ns is not None and t.dst_resume_ns is not None
    assert t.true_pause_ms is not None and t.true_pause_ms > 0
    assert t.qemu_downtime_ms is not None and t.total_time_ms is not None
    assert t.ram_downtime_bytes is not None and (t.ram_downtime_bytes > 0) != postcopy
    assert s.sent == s.received + s.lost
    assert s.sent > 1000
    assert s.lost_in_window > 0  # stock loses frames at switchover
    assert s.lost_outside_window == 0
    assert t.announce_ns, "destination announce not seen on the switch port"
    assert st.vm_host != before
    # The VM answers from its new host; the old host no longer runs a QEMU for it.
    assert st.instance(before, incoming=False) is None
    sent, received = _ping(st, 0.5)
    assert received == sent


def test_lab_up_twice_is_refused(lab_up: lab.LabState) -> None:
    r = run_cli("lab", "up", "--name", lab_up.name)
    assert r.returncode == 1
    assert "already up" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    sent, received = _ping(lab_up, 0.3)  # the running lab is untouched
    assert received == sent


def test_qemu_missing_creates_nothing() -> None:
    name = "npqx"
    env = dict(os.environ, PATH="/nonexistent")
    r = run_cli("lab", "up", "--name", name, env=env)
    assert r.returncode == 1
    assert "qemu-system-x86_64 not found" in r.stderr
    assert leftovers(name) == []


def test_down_after_killed_run_leaves_nothing() -> None:
    """A lab whose CLI died mid-way (state present, processes running) is fully removed."""
    name = f"npk{os.getpid() % 100000}"
    st = lab.up(name, progress=False)
    src = st.instance("a", incoming=False)
    assert src is not None
    (lab.RUN_DIR / name / "state.json").write_text("{corrupt")  # as if killed mid-write
    r = run_cli("lab", "down", "--name", name)
    assert r.returncode == 0, r.stderr
    assert leftovers(name) == []


def test_bench_survives_a_vm_that_dies_between_runs(tmp_path: Path) -> None:
    """The lab VM exits after the bench checked it and before its run: the bench says why,
    boots a new VM, makes the run on it, and writes every run to its raw file."""
    name = f"npk{os.getpid() % 100000}"
    killed: list[int] = []

    def driver_for(c: bench.Cell) -> trial.Driver:
        if not killed:
            st = lab.load(name)
            inst = st.instance(st.vm_host, incoming=False)
            assert inst is not None
            vm.kill(inst.pid, inst.name)
            killed.append(inst.pid)
        return lab_driver(c.mode, c.postcopy, None, None)

    raw = tmp_path / "raw.json"
    try:
        results = bench.run_bench(
            name, ["stock"], 2, [1000], 0, tmp_path / "b.md", raw, Console(),
            driver_for=driver_for,
        )  # fmt: skip
    finally:
        lab.down(name)
    assert len(killed) == 1
    (runs,) = results.values()
    assert len(runs) == 2 and all(r.stats.sent > 0 for r in runs)
    assert [len(v) for v in json.loads(raw.read_text()).values()] == [2]
    assert leftovers(name) == []
