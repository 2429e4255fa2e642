"""Two hosts: the switchover through the agents of host A and host B (real QEMU, taps, TLS)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import leftovers
from netpass import lab, trial, wire
from netpass.agent.channel import HandshakeError, connect
from netpass.agent.tls import client_context, make_test_pki
from netpass.cli import lab_driver
from netpass.datapath import tc
from netpass.errors import UsageError
from netpass.twohost import AgentAddress, migrate_two_hosts


@pytest.fixture(scope="module")
def lab2() -> Iterator[lab.LabState]:
    name = f"npu{os.getpid() % 100000}"
    st = lab.up(name, progress=False, agents=True)
    try:
        yield st
    finally:
        lab.down(name)
        assert leftovers(name) == []


def _tc_clean(st: lab.LabState) -> None:
    for inst in st.instances:
        for tap in inst.taps:
            ns = st.host_ns(inst.host)
            prios = tc.egress_filter_prios(tap, netns=ns)
            assert not [p for p in prios if tc.PRIO_BASE <= p < tc.PRIO_BASE + 16], tap
            if tc.has_hold(tap, netns=ns):
                assert tc.Hold(tap, netns=ns).stats().qlen == 0


def _status(st: lab.LabState) -> dict[str, object]:
    return lab.load(st.name).status()


def _addr(st: lab.LabState, host: str, port_offset: int = 0) -> AgentAddress:
    return AgentAddress(st.host_ip(host), lab.AGENT_PORT + port_offset, netns=st.client_ns)


def _tls(st: lab.LabState) -> tuple[Path, object]:
    pki = st.run_dir / "pki"
    return pki, client_context(
        pki / "client.crt", pki / "client.key", pki / "ca.crt", check_hostname=False
    )


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_two_host_lossless(lab2: lab.LabState, postcopy: bool) -> None:
    st = lab.load(lab2.name)
    lab.ensure_incoming(st, paused=True)
    run = trial.run_trial(st, "np2", 1000, lab_driver("netpass", postcopy, None, None))
    s, n = run.stats, run.timing.netpass
    assert n.get("agents") is True and n.get("error") is None, n
    assert s.sent > 1000 and s.lost == 0 and s.reordered == 0 and s.duplicates == 0
    assert n["sent by the source agent"] > 0  # the pause had traffic to rescue
    assert n["injected"] == n["sent by the source agent"] and n["digests match"] is True
    _tc_clean(lab.load(lab2.name))


def test_agent_refuses_a_peer_from_another_ca(lab2: lab.LabState, tmp_path: Path) -> None:
    other = make_test_pki(tmp_path)
    addr = _addr(lab2, "a")

    async def attempt() -> None:
        await connect(
            addr.host, addr.port, other.client_context(check_hostname=False),
            wire.Role.ORCHESTRATOR, "intruder", netns=addr.netns,
        )  # fmt: skip

    with pytest.raises(HandshakeError):
        asyncio.run(attempt())
    # It still serves: a migration through it works.
    st = lab.load(lab2.name)
    lab.ensure_incoming(st, paused=True)
    run = trial.run_trial(st, "np2", 500, lab_driver("netpass", False, None, None))
    assert run.timing.netpass.get("error") is None and run.stats.lost == 0


def test_unreachable_agent_required_vs_preferred(lab2: lab.LabState) -> None:
    st = lab.load(lab2.name)
    lab.ensure_incoming(st, paused=True)
    s = st.status()
    _, tls = _tls(st)
    src = s["source"]
    dst = s["destination"]
    assert isinstance(src, dict) and isinstance(dst, dict)
    good = _addr(st, src["host"])
    bad = dataclasses.replace(_addr(st, dst["host"]), port=lab.AGENT_PORT + 10)
    args = (src["qmp"], dst["qmp"], s["migration_uri"], good, bad, tls)
    with pytest.raises(UsageError, match="agent not usable"):
        asyncio.run(migrate_two_hosts(*args, netpass="required"))  # type: ignore[arg-type]
    timing = asyncio.run(migrate_two_hosts(*args, netpass="preferred"))  # type: ignore[arg-type]
    assert timing.mode == "stock" and "agent not usable" in str(timing.netpass["error"])
    lab.migrated(st)


def test_source_agent_killed_watchdog_restores_the_tap(lab2: lab.LabState) -> None:
    """SIGKILL the source agent after capture-on: its watchdog removes the redirect."""
    st = lab.load(lab2.name)
    host = st.vm_host
    src = st.instance(host, incoming=False)
    assert src is not None
    tap, ns = src.taps[0], st.host_ns(host)
    tc.add_egress_redirect(tap, "lo", slot=3, netns=ns)  # what a capture-on leaves
    assert tc.egress_filter_prios(tap, netns=ns)
    os.kill(st.agents[host], signal.SIGKILL)
    deadline = time.monotonic() + 1.0
    while tc.egress_filter_prios(tap, netns=ns) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not tc.egress_filter_prios(tap, netns=ns), "watchdog did not sweep within 1 s"
    # A new agent sweeps at start and serves again.
    lab.start_agents(st, hosts=host)
    st.save()
