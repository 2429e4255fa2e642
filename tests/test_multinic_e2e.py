"""A VM with two NICs: netpass rescues frames on both, each in order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from conftest import leftovers, needs_root
from netpass import lab, trial
from netpass.analysis import analyze
from netpass.orchestrator import migrate_netpass

pytestmark = [needs_root, pytest.mark.e2e]


@pytest.fixture(scope="module")
def lab2() -> Iterator[lab.LabState]:
    name = f"npm{os.getpid() % 100000}"
    st = lab.up(name, nics=2, progress=False)
    try:
        yield st
    finally:
        lab.down(name)
        assert leftovers(name) == []


def test_two_nics_lossless(lab2: lab.LabState) -> None:
    st = lab2
    lab.ensure_incoming(st, paused=True)
    s = st.status()
    with contextlib.ExitStack() as stack:
        finishers = [stack.enter_context(trial.probe(st, 1000, nic=k)) for k in (0, 1)]
        time.sleep(0.5)
        timing = asyncio.run(
            migrate_netpass(
                s["source"]["qmp"], s["destination"]["qmp"], s["migration_uri"],
                max_bandwidth=1 << 30,
            )
        )  # fmt: skip
        lab.migrated(st)
        time.sleep(0.5)
        results = [analyze(f(), timing.src_stop_ns, timing.dst_resume_ns) for f in finishers]
    nics = timing.netpass["nics"]
    assert len(nics) == 2 and all(n["rescued"] > 0 for n in nics)
    assert timing.netpass.get("error") is None
    for r in results:
        assert r.sent > 1000 and r.lost == 0 and r.duplicates == 0 and r.reordered == 0
