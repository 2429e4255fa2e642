from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from netpass import lab, netns, trial
from netpass.analysis import ProbeStats, analyze
from netpass.datapath import tc
from netpass.errors import MigrationError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netpass.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def leftovers(name: str) -> list[str]:
    """Everything of lab `name` still on the machine."""
    found = [f"namespace {n}" for n in netns.list_names(f"{name}-")]
    found += [f"run dir {lab.RUN_DIR / name}"] if (lab.RUN_DIR / name).exists() else []
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    found += [
        f"process {ln}"
        for ln in out.splitlines()
        if f"{name}-vm" in ln and ln.split()[1][0] != "Z"  # zombies wait for init to reap them
    ]
    return found


@pytest.fixture(scope="module")
def lab_up() -> Iterator[lab.LabState]:
    name = f"npt{os.getpid() % 100000}"
    st = lab.up(name, progress=False)
    try:
        yield st
    finally:
        lab.down(name)
        assert leftovers(name) == []


def tc_clean(st: lab.LabState) -> None:
    """No netpass redirect filter and no closed hold on any tap of the lab."""
    for inst in st.instances:
        for tap in inst.taps:
            ns = st.host_ns(inst.host)
            prios = tc.egress_filter_prios(tap, netns=ns)
            assert not [p for p in prios if tc.PRIO_BASE <= p < tc.PRIO_BASE + 16], tap
            if tc.has_hold(tap, netns=ns):
                assert tc.Hold(tap, netns=ns).stats().qlen == 0


def fails_under_probe(
    st: lab.LabState, go: Callable[[], Coroutine[Any, Any, object]], match: str
) -> ProbeStats:
    """Run GO under a 1000 pps probe; it must raise MigrationError matching MATCH. The probe's
    statistics, with half a second after the failure for the source VM to answer again."""
    with trial.probe(st, 1000) as finish:
        time.sleep(0.3)
        with pytest.raises(MigrationError, match=match):
            asyncio.run(go())
        time.sleep(0.5)
        return analyze(finish())
