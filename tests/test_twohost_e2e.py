"""Two hosts: the switchover through the agents of host A and host B (real QEMU, taps, TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import ssl
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import fails_under_probe, leftovers, tc_clean
from faultproxy import FaultProxy
from netpass import lab, trial, vm, wire
from netpass.agent.channel import Channel, HandshakeError, connect
from netpass.agent.tls import client_context, make_test_pki
from netpass.analysis import analyze
from netpass.cli import lab_driver
from netpass.datapath import tc
from netpass.datapath.netns import in_netns
from netpass.errors import UsageError
from netpass.orchestrator import Progress
from netpass.results import MigrationTiming
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


def _status(st: lab.LabState) -> dict[str, object]:
    return lab.load(st.name).status()


def _addr(st: lab.LabState, host: str, port_offset: int = 0) -> AgentAddress:
    return AgentAddress(st.host_ip(host), lab.AGENT_PORT + port_offset, netns=st.client_ns)


def _ctx(st: lab.LabState) -> ssl.SSLContext:
    pki = st.run_dir / "pki"
    return client_context(
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
    assert 0 <= n["rescued injected after RESUME (ms)"] < 1000 and n["held"] >= 0
    # The agent confirmed its hold (ACK(HOLD)), so `cont` went out before the load ended.
    assert str(n["destination start"]).startswith(("by QEMU once loaded", "cont queued")), n
    # Postcopy: readied before netpass has the source stop (HOLD to both agents, then cont).
    assert (n["cont sent after STOP seen (ms)"] < 0) is postcopy, n
    # The owed frames are accounted and moved once the destination runs, not while it loads
    # the device state and starts.
    assert n["accounting"] == "after the destination's RESUME", n
    # Both lab "hosts" share this machine's clock: the measured offset is ~0 within its bound.
    assert abs(n["clock offset dst-src (ms)"]) <= n["pause uncertainty ± (ms)"] + 0.5
    pause = run.timing.true_pause_ms
    assert pause is not None and abs(n["pause corrected (ms)"] - pause) <= 1.0
    tc_clean(lab.load(lab2.name))
    # The destination agent's /metrics counts what it did, frame channel included.
    dst_host = lab.load(lab2.name).vm_host
    m = _metrics(st.host_ns(dst_host))
    assert m['netpass_migrations_total{outcome="completed",side="destination"}'] >= 1
    assert m["netpass_frames_injected_total"] >= n["injected"]
    assert m['netpass_agent_frame_channel_connections_total{outcome="ok"}'] >= 1
    assert m["netpass_agent_frame_channel_frames_received_total"] >= n["injected"]
    assert m['netpass_agent_connections_total{outcome="ok"}'] >= 1


def _metrics(netns: str) -> dict[str, float]:
    """Samples of a lab agent's /metrics (served on 127.0.0.1 of its host namespace)."""

    def scrape() -> str:
        with in_netns(netns):
            s = socket.create_connection(("127.0.0.1", lab.AGENT_METRICS_PORT), timeout=5)
        with s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            return b"".join(iter(lambda: s.recv(65536), b"")).decode()

    body = scrape().split("\r\n\r\n", 1)[1]
    return {
        k: float(v)
        for k, _, v in (ln.rpartition(" ") for ln in body.splitlines())
        if k and not k.startswith("#")
    }


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
    tls = _ctx(st)
    src = s["source"]
    dst = s["destination"]
    assert isinstance(src, dict) and isinstance(dst, dict)
    good = _addr(st, src["host"])
    bad = dataclasses.replace(_addr(st, dst["host"]), port=lab.AGENT_PORT + 10)
    args = (src["qmp"], dst["qmp"], s["migration_uri"], good, bad, tls)
    with pytest.raises(UsageError, match="agent not usable"):
        asyncio.run(migrate_two_hosts(*args, netpass="required"))
    timing = asyncio.run(migrate_two_hosts(*args, netpass="preferred"))
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


async def _connect(st: lab.LabState, host: str, role: wire.Role, port_offset: int = 0) -> Channel:
    a = _addr(st, host, port_offset)
    return await connect(a.host, a.port, _ctx(st), role, "test", netns=a.netns)


def test_agent_bad_input_is_refused_and_it_keeps_serving(lab2: lab.LabState) -> None:
    st = lab.load(lab2.name)
    inc = lab.ensure_incoming(st, paused=True)
    mac = bytes.fromhex(st.vm_mac(0).replace(":", ""))

    async def scenario() -> None:
        # A tap nobody has: the agent says why and stays usable on the same channel.
        ch = await _connect(st, inc.host, wire.Role.ORCHESTRATOR)
        mid = uuid.uuid4()
        await ch.send(wire.Prepare(mid, "vm", (wire.NicSpec(0, "npnosuchtap", mac),)))
        ev = await ch.recv()
        assert isinstance(ev, wire.Abort) and "npnosuchtap" in ev.reason
        await ch.send(wire.Ack(mid, wire.MsgType.ABORT))
        # A real migration id on this (destination) agent, then a frame channel that sends
        # frames for another MAC: refused, connection closed, nothing injected.
        mid = uuid.uuid4()
        await ch.send(wire.Prepare(mid, "vm", (wire.NicSpec(0, inc.taps[0], mac),)))
        assert isinstance(await ch.recv(), wire.Prepared)
        fr = await _connect(st, inc.host, wire.Role.SOURCE_AGENT, 1)
        await fr.send(wire.Prepare(mid, "vm", (wire.NicSpec(0, "tapx", mac),)))
        assert isinstance(await fr.recv(), wire.Prepared)
        await fr.send(wire.CaptureOn(mid))
        assert isinstance(await fr.recv(), wire.Ack)
        bad = b"\x52\x54\x00\x99\x99\x99" + mac + b"\x08\x00" + bytes(46)
        for msg in fr.conn.batch_frames(0, [wire.FrameRecord(bad)]):
            await fr.send(msg)
        ev = await fr.recv()
        assert isinstance(ev, wire.Error | wire.ConnectionClosed), ev
        assert "nothing of this batch is injected" in getattr(ev, "message", "")
        # An unknown migration on the frame channel is refused too.
        fr2 = await _connect(st, inc.host, wire.Role.SOURCE_AGENT, 1)
        await fr2.send(wire.Prepare(uuid.uuid4(), "vm", (wire.NicSpec(0, "tapx", mac),)))
        ev = await fr2.recv()
        assert isinstance(ev, wire.Error) and "unknown migration" in ev.message
        await ch.send(wire.Abort(mid, "test over"))
        assert isinstance(await ch.recv(), wire.Ack)
        await ch.close()

    asyncio.run(scenario())
    # Still serving: a migration through both agents works.
    run = trial.run_trial(st, "np2", 500, lab_driver("netpass", False, None, None))
    assert run.timing.netpass.get("error") is None and run.stats.lost == 0


@pytest.mark.parametrize("side", ["source", "destination"])
def test_agent_killed_mid_migration_migration_completes(lab2: lab.LabState, side: str) -> None:
    """An agent dies during precopy: the migration completes (stock), the cause is reported,
    the dead agent's watchdog restores its tap, the VM answers on the destination."""
    st = lab.load(lab2.name)
    lab.ensure_incoming(st, paused=True)
    s = st.status()
    src, dst = s["source"], s["destination"]
    assert isinstance(src, dict) and isinstance(dst, dict)
    host = src["host"] if side == "source" else dst["host"]
    agent_pid = st.agents[host]

    async def go() -> MigrationTiming:
        task = asyncio.create_task(
            migrate_two_hosts(
                src["qmp"], dst["qmp"], str(s["migration_uri"]),
                _addr(st, src["host"]), _addr(st, dst["host"]), _ctx(st),
                max_bandwidth=20_000_000,
            )
        )  # fmt: skip
        await asyncio.sleep(1.0)  # precopy of 128 MiB at 20 MB/s takes seconds
        os.kill(agent_pid, signal.SIGKILL)
        return await task

    with trial.probe(st, 1000) as finish:
        timing = asyncio.run(go())
        time.sleep(0.5)
        stats = analyze(finish())
    lab.migrated(st)
    assert "error" in timing.netpass, timing.netpass
    assert timing.completed_ns is not None
    assert stats.received > 0
    tc_clean(st)
    # The VM answers on its new host.
    with trial.probe(st, 1000) as finish2:
        time.sleep(0.5)
        after = analyze(finish2())
    assert after.sent > 100 and after.received == after.sent
    lab.start_agents(st, hosts=host)
    st.save()


def test_destination_killed_at_the_stop_gives_frames_back(lab2: lab.LabState) -> None:
    """The destination QEMU dies at the source's STOP, after the destination agent closed its
    hold but before the accounting (which waits for a RESUME that never comes): the source
    fails, runs again, and its agent gives back exactly what the stopped guest did not take,
    the frames QEMU dropped during its own stop included. Both agents acknowledge the ABORT
    (the destination's hold is on a tap whose QEMU is gone)."""
    st = lab.load(lab2.name)
    dst_inst = lab.ensure_incoming(st, paused=True)
    s = st.status()
    src, dst = s["source"], s["destination"]
    assert isinstance(src, dict) and isinstance(dst, dict)
    hit: list[str] = []
    aborted = 'netpass_migrations_total{outcome="aborted",side="%s"}'
    before = _metrics(st.host_ns(src["host"])).get(aborted % "source", 0.0)
    before_dst = _metrics(st.host_ns(dst["host"])).get(aborted % "destination", 0.0)

    def on_progress(p: Progress) -> None:
        if p.phase == "switch" and not hit:
            hit.append(p.phase)
            # At once (a SIGTERM'd QEMU finishes its load first), while the source still has
            # most of its final load to send: it fails and runs again instead of completing
            # into a dead destination (with a 12 MiB final load it did so in 1 run of 40).
            assert vm.is_our_qemu(dst_inst.pid, dst_inst.name)
            os.kill(dst_inst.pid, signal.SIGKILL)

    async def go() -> None:
        await migrate_two_hosts(
            src["qmp"], dst["qmp"], str(s["migration_uri"]),
            _addr(st, src["host"]), _addr(st, dst["host"]), _ctx(st), progress=on_progress,
            downtime_ms=600,  # QEMU stops with about 50 MiB left: the kill lands mid-send
        )  # fmt: skip

    stats = fails_under_probe(st, go, "failed; the source VM runs again")
    lab.stop_instance(st, dst_inst)
    assert hit == ["switch"]
    # Exact, but for the limit design.md states: when the source runs again before QEMU
    # answers the read at the stop and QEMU both dropped a frame and kept the next, the
    # dropped one is lost and the kept one doubled (1 run in 30 here; a loss alone, as before
    # the fix, fails). QEMU hands the kept frame over first: the dropped one can only follow.
    assert stats.sent > 500 and stats.lost == stats.duplicates <= 1, stats
    assert stats.reordered <= 2, stats
    # The source agent gave the frames back and ended the migration as aborted; the
    # destination agent opened its hold and acknowledged (it used to wait out a 10 s timeout).
    assert _metrics(st.host_ns(src["host"])).get(aborted % "source", 0.0) == before + 1
    assert _metrics(st.host_ns(dst["host"])).get(aborted % "destination", 0.0) == before_dst + 1
    _eventually(lambda: tc_clean(lab.load(lab2.name)), 2.0)


def test_four_vms_at_once(lab2: lab.LabState) -> None:
    """Four VMs migrate from host A to host B at the same time through the same two agents,
    each under its own 1000 pps probe: nothing lost in the switchover window, nothing
    reordered or duplicated, every rescued frame delivered, in any. Replies lost after the
    window (the guests' catch-up on two busy cores) are reported as a warning."""
    st = lab.load(lab2.name)
    lab.ensure_incoming(st, paused=True)
    s = st.status()
    src, dst = s["source"], s["destination"]
    assert isinstance(src, dict) and isinstance(dst, dict)
    extras = [lab.add_vm(st, v) for v in (1, 2, 3)]
    try:
        jobs = [(str(src["qmp"]), str(dst["qmp"]), str(s["migration_uri"]), st.vm_ip(0))]
        jobs += [(x.src_qmp, x.dst_qmp, x.uri, x.ip) for x in extras]
        a, b = _addr(st, src["host"]), _addr(st, dst["host"])

        async def all_at_once() -> list[MigrationTiming | BaseException]:
            return await asyncio.gather(
                *(migrate_two_hosts(sq, dq, uri, a, b, _ctx(st)) for sq, dq, uri, _ in jobs),
                return_exceptions=True,
            )

        with contextlib.ExitStack() as stack:
            finishers = [stack.enter_context(trial.probe(st, 1000, target=ip)) for *_, ip in jobs]
            time.sleep(0.5)
            timings = asyncio.run(all_at_once())
            time.sleep(0.5)
            probes = [f() for f in finishers]
        lab.migrated(st)
        main = st.instance(st.vm_host, incoming=False)
        serials = [Path(str(src["serial"]))] + ([Path(main.serial)] if main is not None else [])
        serials += [st.run_dir / f"x{x.v}{h}.serial" for x in extras for h in "ab"]
        _xfail_if_a_guest_died(serials)
        late = []
        for timing, data, job in zip(timings, probes, jobs, strict=True):
            assert isinstance(timing, MigrationTiming), (job, timing)
            n = timing.netpass
            assert n.get("error") is None and n.get("digests match") is True, (job, n)
            r = analyze(data, timing.src_stop_ns, timing.dst_resume_ns)
            assert r.sent > 1000 and (r.reordered, r.duplicates) == (0, 0), (job, r)
            assert r.lost_in_window == 0, (job, r)
            if r.lost_outside_window:
                late.append(f"{job[3]}: {r.lost_outside_window}")
        if late:
            # Not met, reported: four TCG guests catching up at once on two cores sometimes drop
            # echo replies after RESUME + 20 ms (the frames reached their taps: digests match).
            lost = ", ".join(late)
            warnings.warn(f"replies lost after the switchover window: {lost}", stacklevel=1)
    finally:
        for x in extras:
            lab.remove_vm(st, x)
    tc_clean(lab.load(lab2.name))


def _xfail_if_a_guest_died(serials: list[Path]) -> None:
    """The TCG lab guest sometimes dies with a double fault right after RESUME, with or without
    netpass (docs/BENCHMARKS.md): that run says nothing about netpass."""
    for serial in serials:
        if (death := lab.guest_death(serial)) is not None:
            pytest.xfail(f"lab guest died after migration under TCG ({serial.name}: {death})")


FAULTS = [
    ("kill", "source", "switch"),
    ("kill", "source", "deliver"),
    ("kill", "destination", "switch"),
    ("kill", "destination", "deliver"),
    ("cut", "control", "switch"),
    ("cut", "frames", "switch"),
    ("cut", "frames", "deliver"),
    ("tls", "control", "switch"),
    ("tls", "frames", "switch"),
]


@pytest.mark.parametrize("fault,target,phase", FAULTS, ids=["-".join(f) for f in FAULTS])
def test_channel_fault_during_switchover(
    lab2: lab.LabState, fault: str, target: str, phase: str
) -> None:
    """The fault matrix: an agent killed, a connection reset, or a TLS record corrupted, at the
    source's STOP ('switch') or right after the destination's RESUME ('deliver'). The migration
    completes, the cause is reported, no tc object is left, the VM answers on its new host."""
    st = lab.load(lab2.name)
    dead = "".join(h for h, pid in st.agents.items() if not vm.alive(pid))
    if dead:  # an earlier case failed before it restarted the agent it killed
        lab.start_agents(st, hosts=dead)
    lab.ensure_incoming(st, paused=True)
    s = st.status()
    src, dst = s["source"], s["destination"]
    assert isinstance(src, dict) and isinstance(dst, dict)
    # The destination agent is reached through a proxy on its host: control on port+10, frames
    # (the source agent's PEER address) on port+11.
    dst_addr = _addr(st, dst["host"], port_offset=10)
    hit: list[str] = []

    async def go() -> MigrationTiming:
        proxies = [
            FaultProxy(st.host_ns(dst["host"]), st.host_ip(dst["host"]), dst_addr.port + k,
                       lab.AGENT_PORT + k)
            for k in (0, 1)
        ]  # fmt: skip
        control, frames = proxies

        def on_progress(p: Progress) -> None:
            if p.phase != phase or hit:
                return
            hit.append(p.phase)
            if fault == "kill":
                os.kill(st.agents[src["host"] if target == "source" else dst["host"]], 9)
            else:
                proxy = control if target == "control" else frames
                proxy.cut() if fault == "cut" else proxy.corrupt()

        async with control, frames:
            return await migrate_two_hosts(
                src["qmp"], dst["qmp"], str(s["migration_uri"]),
                _addr(st, src["host"]), dst_addr, _ctx(st), progress=on_progress,
            )  # fmt: skip

    with trial.probe(st, 1000) as finish:
        timing = asyncio.run(go())
        time.sleep(0.3)
        finish()
    lab.migrated(st)
    assert hit == [phase]
    assert timing.completed_ns is not None
    assert "error" in timing.netpass, timing.netpass
    error = str(timing.netpass["error"])
    print(f"FAULT {fault} {target} at {phase}: {error}")  # the fault matrix, with pytest -s
    assert "source agent" in error or "destination agent" in error, error
    if phase == "deliver" and (target == "source" or target == "frames"):
        # The source agent is gone after RESUME: the destination agent does not wait for it,
        # opens its hold at once and still reports what it delivered.
        assert "held" in timing.netpass, "; ".join(f"{k}={v}" for k, v in timing.netpass.items())
    if fault == "kill":
        host = src["host"] if target == "source" else dst["host"]
        lab.start_agents(st, hosts=host)
    _eventually(lambda: tc_clean(st), 2.0)
    with trial.probe(st, 1000) as finish2:
        time.sleep(0.5)
        after = analyze(finish2())
    assert after.sent > 100 and after.received == after.sent


def _eventually(check: Callable[[], None], within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
