"""The built-in lab: a client, a learning "physical switch" and two hypervisor hosts.

Topology (every name carries the lab's prefix, default `nplab`):

    {p}-cli  eth0 ──── p-cli ┐
                             {p}-sw  br0 (learning bridge)
    {p}-ha   br0 ─ up0 ─ p-ha ┘ │
      └ tap<i>n<k> ← QEMU       │
    {p}-hb   br0 ─ up0 ─ p-hb ──┘
      └ tap<i>n<k> ← QEMU

QEMU processes run inside the host namespaces; QMP sockets, serial logs and the state file live in
/run/netpass/<lab>/. `down` works from the state file and from the names alone, so it also cleans
up after a crash or a killed run.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from netpass import guest, netns, vm
from netpass.datapath import tc
from netpass.errors import LabError, NetpassError, UsageError
from netpass.sysutil import require_root, require_tool, run

RUN_DIR = Path("/run/netpass")
DEFAULT_NAME = "nplab"
SUBNET = "10.77"
CLIENT_HOST = 1
VM_HOST = 100
HOST_ADDR = {"a": 11, "b": 12}
MIGRATION_PORT = 4444
AGENT_PORT = 7400  # control channel; frames on AGENT_PORT + 1
AGENT_METRICS_PORT = 7409  # /metrics of each lab agent, on 127.0.0.1 of its host namespace
NAME_RE = re.compile(r"^np[a-z0-9]{1,8}$")


@dataclass
class Instance:
    """One QEMU process of the lab VM (the VM exists in one instance at a time, plus incoming)."""

    idx: int
    host: str  # "a" or "b"
    name: str
    pid: int
    qmp: str
    serial: str
    pidfile: str
    taps: list[str]
    incoming: bool
    paused: bool


@dataclass
class LabState:
    name: str
    accel: str
    kernel: str
    initrd: str
    nics: int
    vm_host: str  # host whose QEMU currently runs the VM
    next_idx: int = 0
    instances: list[Instance] = field(default_factory=list)
    agents: dict[str, int] = field(default_factory=dict)  # host -> agent pid
    # Each QEMU faults its guest RAM in at start (-mem-prealloc). Without it a fresh
    # destination faults it in while it loads, and page zeroing (huge pages: 2 MiB at a time,
    # sometimes after compaction) made the same 12 MiB final load take 19-65 ms in stock runs:
    # that noise, not the migration, then decided the pause (docs/BENCHMARKS-two-host-ab-*.md).
    prealloc: bool = True

    # Derived names -------------------------------------------------------------------------
    def ns(self, role: str) -> str:
        return f"{self.name}-{role}"

    @property
    def client_ns(self) -> str:
        return self.ns("cli")

    @property
    def switch_ns(self) -> str:
        return self.ns("sw")

    def host_ns(self, host: str) -> str:
        return self.ns(f"h{host}")

    @staticmethod
    def vm_ip(nic: int) -> str:
        return f"{SUBNET}.{nic}.{VM_HOST}"

    @staticmethod
    def vm_mac(nic: int) -> str:
        return f"52:54:00:4e:50:{nic + 1:02x}"

    @staticmethod
    def host_ip(host: str) -> str:
        return f"{SUBNET}.0.{HOST_ADDR[host]}"

    @property
    def run_dir(self) -> Path:
        return RUN_DIR / self.name

    def migration_uri(self, dst_host: str) -> str:
        return f"tcp:{self.host_ip(dst_host)}:{MIGRATION_PORT}"

    def instance(self, host: str, incoming: bool) -> Instance | None:
        return next((i for i in self.instances if i.host == host and i.incoming == incoming), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabState:
        insts = [Instance(**i) for i in d.pop("instances", [])]
        return cls(**d, instances=insts)

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.rename(self.run_dir / "state.json")

    def status(self) -> dict[str, Any]:
        """Everything an outside tool needs to drive traffic and migrations."""
        src = self.instance(self.vm_host, incoming=False)
        other = "b" if self.vm_host == "a" else "a"
        dst = self.instance(other, incoming=True)

        def inst(i: Instance | None) -> dict[str, Any] | None:
            if i is None:
                return None
            return {
                "host": i.host,
                "netns": self.host_ns(i.host),
                "pid": i.pid,
                "qmp": i.qmp,
                "taps": i.taps,
                "serial": i.serial,
                "incoming": i.incoming,
                "paused": i.paused,
                "alive": vm.alive(i.pid),
            }

        return {
            "name": self.name,
            "accel": self.accel,
            "namespaces": {
                "client": self.client_ns,
                "switch": self.switch_ns,
                "host_a": self.host_ns("a"),
                "host_b": self.host_ns("b"),
            },
            "client_ip": [f"{SUBNET}.{k}.{CLIENT_HOST}" for k in range(self.nics)],
            "vm": {
                "ip": [self.vm_ip(k) for k in range(self.nics)],
                "mac": [self.vm_mac(k) for k in range(self.nics)],
                "host": self.vm_host,
            },
            "hosts": {h: {"ip": self.host_ip(h), "netns": self.host_ns(h)} for h in "ab"},
            "source": inst(src),
            "destination": inst(dst),
            "migration_uri": self.migration_uri(other),
            "agents": {
                h: {
                    "address": f"{self.host_ip(h)}:{AGENT_PORT}",
                    "pid": pid,
                    "alive": vm.alive(pid),
                    "reach_from": self.client_ns,
                }
                for h, pid in self.agents.items()
            },
            "pki": str(self.run_dir / "pki") if self.agents else None,
        }


GUEST_SETTLE_S = 5.0  # see settle()
WARM_UP_TRIES = 3
WARM_UP_WATCH_S = 1.0


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise UsageError(
            f"invalid lab name {name!r}: use 'np' followed by 1-8 lowercase letters or digits"
        )


@contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialise lab commands on one lab (two `lab up` at once must not interleave)."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def load(name: str = DEFAULT_NAME) -> LabState:
    check_name(name)
    path = RUN_DIR / name / "state.json"
    try:
        return LabState.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise LabError(f"lab {name} is not up (run: netpass lab up)") from None
    except (ValueError, TypeError) as e:
        raise LabError(
            f"lab {name} state file {path} is corrupt ({e}); run: netpass lab down"
        ) from e


def is_up(name: str) -> bool:
    return (RUN_DIR / name / "state.json").exists() or bool(netns.list_names(f"{name}-"))


def _create_topology(st: LabState) -> None:
    for role in ("cli", "sw", "ha", "hb"):
        run(["ip", "netns", "add", st.ns(role)])
        run(["ip", "link", "set", "lo", "up"], netns=st.ns(role))
    sw = st.switch_ns
    run(
        ["ip", "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"],
        netns=sw,
    )
    run(["ip", "link", "set", "br0", "up"], netns=sw)
    run(
        [
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            st.client_ns,
            "type",
            "veth",
            "peer",
            "name",
            "p-cli",
            "netns",
            sw,
        ]
    )
    cli = st.client_ns
    for k in range(st.nics):
        run(["ip", "addr", "add", f"{SUBNET}.{k}.{CLIENT_HOST}/24", "dev", "eth0"], netns=cli)
    run(["ip", "link", "set", "eth0", "up"], netns=cli)
    run(["ip", "link", "set", "p-cli", "master", "br0", "up"], netns=sw)
    for h in "ab":
        hns = st.host_ns(h)
        run(
            [
                "ip",
                "link",
                "add",
                "up0",
                "netns",
                hns,
                "type",
                "veth",
                "peer",
                "name",
                f"p-h{h}",
                "netns",
                sw,
            ]
        )
        run(["ip", "link", "set", f"p-h{h}", "master", "br0", "up"], netns=sw)
        # A fixed address: a bridge otherwise takes its lowest port MAC, which changes as taps
        # come and go, and the other host's ARP entry for this one goes stale.
        run(
            [
                "ip",
                "link",
                "add",
                "br0",
                "address",
                f"02:4e:50:00:00:{HOST_ADDR[h]:02x}",
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
            netns=hns,
        )
        run(["ip", "link", "set", "up0", "master", "br0", "up"], netns=hns)
        run(["ip", "addr", "add", f"{st.host_ip(h)}/24", "dev", "br0"], netns=hns)
        run(["ip", "link", "set", "br0", "up"], netns=hns)


def start_instance(st: LabState, host: str, incoming: bool, paused: bool) -> Instance:
    """Create the taps on `host`'s bridge and start a QEMU there (booted, or waiting incoming)."""
    idx = st.next_idx
    st.next_idx += 1
    taps = [f"tap{idx}n{k}" for k in range(st.nics)]
    for tap in taps:
        _add_tap(st, host, tap)
    nics = [vm.Nic(t, st.vm_mac(k), f"{st.vm_ip(k)}/24") for k, t in enumerate(taps)]
    spec = _spec(st, f"vm{idx}", host, nics, incoming, paused)
    pid = vm.start(spec, _image(st))
    inst = Instance(
        idx,
        host,
        spec.name,
        pid,
        str(spec.qmp_path),
        str(spec.serial_path),
        str(spec.pidfile),
        taps,
        incoming,
        paused,
    )
    st.instances.append(inst)
    st.save()
    if not incoming:
        vm.wait_ready(spec.serial_path, 90, pid)
    return inst


def _add_tap(st: LabState, host: str, tap: str) -> None:
    hns = st.host_ns(host)
    run(["ip", "tuntap", "add", tap, "mode", "tap", "vnet_hdr"], netns=hns)
    # Like a host's VIF hook would: netpass's qdiscs exist before the tap carries traffic.
    tc.prepare_tap(tap, netns=hns)
    run(["ip", "link", "set", tap, "master", "br0", "up"], netns=hns)


def _spec(
    st: LabState, stem: str, host: str, nics: list[vm.Nic], incoming: bool, paused: bool
) -> vm.VmSpec:
    """A lab QEMU named {lab}-{stem}, its files {stem}.qmp/.serial/.pid in the run dir."""
    d = st.run_dir
    return vm.VmSpec(
        name=f"{st.name}-{stem}",
        netns=st.host_ns(host),
        nics=nics,
        qmp_path=d / f"{stem}.qmp",
        serial_path=d / f"{stem}.serial",
        pidfile=d / f"{stem}.pid",
        accel=st.accel,
        incoming=incoming,
        paused=paused,
        prealloc=st.prealloc,
    )


def _image(st: LabState) -> guest.GuestImage:
    return guest.GuestImage(Path(st.kernel), Path(st.initrd), "")


@dataclass
class ExtraVm:
    """Another VM on the lab's hosts (NIC 0's subnet), for concurrent migrations. Not part of
    the lab state: `lab down` removes it with everything else in the namespaces."""

    v: int
    ip: str
    mac: str
    src_qmp: str
    dst_qmp: str
    uri: str
    pids: list[int]


def add_vm(st: LabState, v: int, tries: int = WARM_UP_TRIES) -> ExtraVm:
    """Boot VM number V (1-9) for the host running the lab VM, with an incoming -S QEMU on the
    other host and its own migration port. Like the lab VM it is warmed up (see warm_up):
    migrated there and back, unmeasured, and booted again if that killed it."""
    if not 1 <= v <= 9:
        raise UsageError("extra VM number must be 1-9")
    from netpass.orchestrator import migrate_stock

    src_host = st.vm_host
    dst_host = "b" if src_host == "a" else "a"
    mac, ip = f"52:54:00:4e:6{v}:01", f"{SUBNET}.0.{VM_HOST + v}"
    for host in (src_host, dst_host):
        _add_tap(st, host, f"tapx{v}{host}")
    for attempt in range(tries):
        pid, qmp = _start_extra(st, v, src_host, mac, ip, incoming=False)
        settle()
        alive = True
        for there in (dst_host, src_host):  # there and back, as warm_up does
            here = "b" if there == "a" else "a"
            new_pid, new_qmp = _start_extra(st, v, there, mac, ip, incoming=True, paused=False)
            uri = f"tcp:{st.host_ip(there)}:{MIGRATION_PORT + v}"
            try:
                asyncio.run(migrate_stock(qmp, new_qmp, uri))
            finally:
                vm.kill(pid, f"{st.name}-x{v}{here}")
            pid, qmp = new_pid, new_qmp
            alive = survived(pid, st.run_dir / f"x{v}{there}.serial")
            if not alive:
                break
        if alive:
            src_pid, src_qmp = pid, qmp
            break
        vm.kill(pid, f"{st.name}-x{v}{there}")
        if attempt == tries - 1:
            raise LabError(f"extra VM {v} died in its warm-up migrations, {tries} times")
    dst_pid, dst_qmp = _start_extra(st, v, dst_host, mac, ip, incoming=True, paused=True)
    uri = f"tcp:{st.host_ip(dst_host)}:{MIGRATION_PORT + v}"
    return ExtraVm(v, ip, mac, src_qmp, dst_qmp, uri, [src_pid, dst_pid])


def _start_extra(
    st: LabState, v: int, host: str, mac: str, ip: str, incoming: bool, paused: bool = False
) -> tuple[int, str]:
    nics = [vm.Nic(f"tapx{v}{host}", mac, f"{ip}/24")]
    spec = _spec(st, f"x{v}{host}", host, nics, incoming, paused)
    if not incoming:
        spec.serial_path = st.run_dir / f"x{v}{host}-boot.serial"
    pid = vm.start(spec, _image(st))
    if not incoming:
        vm.wait_ready(spec.serial_path, 90, pid)
    return pid, str(spec.qmp_path)


def remove_vm(st: LabState, x: ExtraVm) -> None:
    for pid in x.pids:
        if vm.alive(pid):
            os.kill(pid, signal.SIGKILL)
    for host in "ab":
        run(["ip", "link", "del", f"tapx{x.v}{host}"], netns=st.host_ns(host), check=False)


def stop_instance(st: LabState, inst: Instance) -> None:
    vm.kill(inst.pid, inst.name)
    for tap in inst.taps:
        run(["ip", "link", "del", tap], netns=st.host_ns(inst.host), check=False)
    st.instances.remove(inst)
    st.save()


def flush_learning(st: LabState) -> None:
    """Forget where the VM was: switch and host bridges' FDB, the client's ARP cache."""
    run(["ip", "link", "set", "br0", "type", "bridge", "fdb_flush"], netns=st.switch_ns)
    for h in "ab":
        run(["ip", "link", "set", "br0", "type", "bridge", "fdb_flush"], netns=st.host_ns(h))
    run(["ip", "neigh", "flush", "dev", "eth0"], netns=st.client_ns)


def up(
    name: str = DEFAULT_NAME,
    nics: int = 1,
    progress: bool = True,
    agents: bool = False,
    prealloc: bool = True,
) -> LabState:
    require_root()
    check_name(name)
    if not 1 <= nics <= 4:
        raise UsageError("--nics must be between 1 and 4")
    require_tool(vm.QEMU, "qemu-system-x86")
    require_tool("ip", "iproute2")
    with locked(name):
        if is_up(name):
            raise UsageError(f"lab {name} is already up (run: netpass lab down --name {name})")
        image = guest.build(progress=progress)
        st = LabState(
            name=name,
            accel="tcg",
            kernel=str(image.kernel),
            initrd=str(image.initrd),
            nics=nics,
            vm_host="a",
            prealloc=prealloc,
        )
        try:
            st.run_dir.mkdir(parents=True, exist_ok=True)
            st.save()
            _create_topology(st)
            st.accel = vm.choose_accel(st.host_ns("a"), image, st.run_dir)
            if progress:
                print(f"netpass: booting the VM in {st.host_ns('a')} ({st.accel})", flush=True)
            start_instance(st, "a", incoming=False, paused=False)
            start_instance(st, "b", incoming=True, paused=False)
            if agents:
                start_agents(st)
            warm_up(st)
            ensure_incoming(st, paused=False)
        except (NetpassError, OSError) as e:
            _teardown(name)
            raise LabError(f"lab up failed, everything removed: {e}") from e
        return st


def ensure_incoming(st: LabState, paused: bool) -> Instance:
    """An incoming QEMU on the host that does not run the VM, started with -S when `paused`."""
    other = "b" if st.vm_host == "a" else "a"
    inst = st.instance(other, incoming=True)
    if inst is not None and (inst.paused != paused or not vm.alive(inst.pid)):
        stop_instance(st, inst)
        inst = None
    return inst or start_instance(st, other, incoming=True, paused=paused)


def migrated(st: LabState) -> None:
    """Record a completed migration: the old source quits, the incoming one runs the VM."""
    old = st.instance(st.vm_host, incoming=False)
    if old is not None:
        stop_instance(st, old)
    other = "b" if st.vm_host == "a" else "a"
    new = st.instance(other, incoming=True)
    if new is not None:
        new.incoming = False
    st.vm_host = other
    st.save()


def fresh_vm(st: LabState, paused_incoming: bool = False) -> None:
    """Kill every QEMU of the lab and boot a new, warmed-up VM on host A."""
    _reboot(st)
    warm_up(st)
    ensure_incoming(st, paused=paused_incoming)


def start_agents(st: LabState, hosts: str = "ab") -> None:
    """A netpass agent in each host namespace, listening on the lab network (mutual TLS with
    a lab CA in the run directory); the orchestrator reaches them from the client namespace."""
    from netpass.agent.daemon import READY_LINE
    from netpass.agent.tls import TestPki, make_test_pki

    pki_dir = st.run_dir / "pki"
    if (pki_dir / "ca.crt").exists():
        pki = TestPki.at(pki_dir)
    else:
        pki = make_test_pki(pki_dir, server_names=(st.host_ip("a"), st.host_ip("b"), "localhost"))
    for h in hosts:
        log = st.run_dir / f"agent-{h}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", st.host_ns(h), sys.executable, "-c",
                 "from netpass.cli import main; raise SystemExit(main())", "agent",
                 "--listen", f"{st.host_ip(h)}:{AGENT_PORT}", "--tls-cert", str(pki.server_cert),
                 "--metrics-port", str(AGENT_METRICS_PORT),
                 "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca_cert)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        st.agents[h] = proc.pid
        st.save()
        deadline = time.monotonic() + 20
        while READY_LINE not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"agent on host {h} did not start: {log.read_text()[-500:]}")
            time.sleep(0.05)


def settle() -> None:
    """Let a freshly booted guest get past its first seconds before it is migrated."""
    time.sleep(GUEST_SETTLE_S)


def warm_up(st: LabState, tries: int = WARM_UP_TRIES) -> None:
    """Settle a freshly booted guest, then migrate it there and back (stock, unmeasured).

    Why: the lab guest (TCG, QEMU 7.2) sometimes dies (double fault or GPF in the idle task)
    right after RESUME of its *first* migration, a few seconds after boot: 6 of 140 fresh-VM
    bench runs, stock and netpass alike, and 1 of 20 in a rerun; 0 of 60 back-and-forth
    migrations of a guest that had been migrated before (10,000 pps probe; tools/crash_rate.py).
    A guest that dies here is booted again."""
    from netpass.orchestrator import migrate_stock

    for attempt in range(tries):
        settle()
        try:
            for _ in range(2):
                inc = ensure_incoming(st, paused=False)
                src = st.instance(st.vm_host, incoming=False)
                assert src is not None
                asyncio.run(migrate_stock(src.qmp, inc.qmp, st.migration_uri(inc.host)))
                migrated(st)
                if not survived(inc.pid, Path(inc.serial)):
                    raise LabError("the guest died after its warm-up migration")
            return
        except (NetpassError, OSError) as e:
            if attempt == tries - 1:
                raise LabError(f"lab guest did not survive its warm-up migrations: {e}") from e
            _reboot(st)


def survived(pid: int, serial: Path, wait_s: float = WARM_UP_WATCH_S) -> bool:
    """The migrated guest still runs WAIT_S after RESUME (a dying one panics within ~10 ms,
    but QEMU can take longer to exit)."""
    time.sleep(wait_s)
    return vm.alive(pid) and guest_death(serial) is None


def guest_death(serial: Path) -> str | None:
    """The serial log's first line saying the guest died (panic, double fault), if any."""
    text = serial.read_text(errors="replace") if serial.exists() else ""
    return next(
        (ln for ln in text.splitlines() if "Kernel panic" in ln or "double fault" in ln), None
    )


def _reboot(st: LabState) -> None:
    for inst in list(st.instances):
        stop_instance(st, inst)
    st.vm_host = "a"
    flush_learning(st)
    start_instance(st, "a", incoming=False, paused=False)


def vm_running(st: LabState) -> bool:
    """The lab VM's QEMU still runs (a guest panic ends it: -no-reboot, panic=-1)."""
    inst = st.instance(st.vm_host, incoming=False)
    return inst is not None and vm.alive(inst.pid)


def vm_death(st: LabState) -> str:
    """Why the lab VM is gone: the serial log's panic line, if the guest left one."""
    inst = st.instance(st.vm_host, incoming=False)
    death = guest_death(Path(inst.serial)) if inst is not None else None
    return death or "its QEMU exited, no panic in the serial log"


def _teardown(name: str) -> list[str]:
    """Remove every trace of lab `name`; returns what was removed. Never raises for leftovers."""
    removed: list[str] = []
    state_file = RUN_DIR / name / "state.json"
    try:
        st = LabState.from_dict(json.loads(state_file.read_text()))
        for inst in st.instances:
            if vm.is_our_qemu(inst.pid, inst.name):
                vm.kill(inst.pid, inst.name)
                removed.append(f"process {inst.pid} ({inst.name})")
    except (OSError, ValueError, TypeError):
        pass
    # Anything still running inside our namespaces was started by the lab (QEMU, probes);
    # tc objects and taps inside them go away with the namespaces.
    for ns_name in netns.list_names(f"{name}-"):
        for pid in netns.pids_in(ns_name):
            try:
                os.kill(pid, signal.SIGKILL)
                removed.append(f"process {pid} in {ns_name}")
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        run(["ip", "netns", "del", ns_name], check=False)
        removed.append(f"namespace {ns_name}")
    shutil.rmtree(RUN_DIR / name, ignore_errors=True)
    return removed


def down(name: str = DEFAULT_NAME) -> list[str]:
    require_root()
    check_name(name)
    with locked(name):
        return _teardown(name)
