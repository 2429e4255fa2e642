from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from netpass import lab, netns
from netpass.datapath import tc

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
