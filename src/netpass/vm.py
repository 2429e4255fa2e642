"""Launching the lab's QEMU guests: command line, accelerator choice, readiness.

QEMU runs inside a host namespace (so its tap lives there), detached, with a pidfile, its
output in a log and a QMP unix socket that the orchestrator reaches from any namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from netpass.errors import HostError, LabError
from netpass.guest import CACHE_DIR, READY_MARKER, GuestImage
from netpass.sysutil import require_tool

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class Nic:
    tap: str
    mac: str
    ip: str  # address/prefix inside the guest, e.g. 10.77.0.100/24


@dataclass
class VmSpec:
    name: str  # also the QEMU process name, carries the lab prefix
    netns: str
    nics: list[Nic]
    qmp_path: Path
    serial_path: Path
    pidfile: Path
    accel: str = "tcg"
    memory_mb: int = 128
    incoming: bool = False  # -incoming defer: wait for migrate-incoming
    paused: bool = False  # -S: stay paused after an incoming migration until 'cont'
    prealloc: bool = False  # -mem-prealloc: guest RAM faulted in at start, not during a load
    extra: list[str] = field(default_factory=list)

    def argv(self, image: GuestImage) -> list[str]:
        ips = ",".join(f"eth{i}:{n.ip}" for i, n in enumerate(self.nics))
        cpu = ["-cpu", "qemu64"] if self.accel == "tcg" else ["-cpu", "qemu64,-cx16"]
        argv = [
            QEMU,
            "-name",
            # Named threads (live_migration, CPU 0/TCG, ...) tell perf and top -H what runs.
            f"{self.name},process={self.name},debug-threads=on",
            "-machine",
            "pc",
            "-accel",
            self.accel,
            *cpu,
            "-m",
            str(self.memory_mb),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
            "-no-reboot",
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(image.initrd),
            "-append",
            f"console=ttyS0 quiet panic=-1 netpass.ip={ips}",
            "-serial",
            f"file:{self.serial_path}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-pidfile",
            str(self.pidfile),
        ]
        for i, nic in enumerate(self.nics):
            argv += [
                "-netdev",
                f"tap,id=net{i},ifname={nic.tap},script=no,downscript=no,vhost=off",
                "-device",
                f"virtio-net-pci,netdev=net{i},mac={nic.mac},id=nic{i}",
            ]
        if self.prealloc:
            argv.append("-mem-prealloc")
        if self.incoming:
            argv += ["-incoming", "defer"]
        if self.paused:
            argv.append("-S")
        return argv + self.extra


def start(spec: VmSpec, image: GuestImage) -> int:
    """Start QEMU inside spec.netns, detached, its output in <serial>.log; returns its PID once
    the QMP socket exists."""
    require_tool(QEMU, "qemu-system-x86")
    for p in (spec.qmp_path, spec.serial_path, spec.pidfile):
        p.unlink(missing_ok=True)
    log_path = spec.serial_path.with_suffix(".log")
    with open(log_path, "wb") as log:
        # `ip netns exec` execs QEMU, so the child's PID is QEMU's.
        proc = subprocess.Popen(
            ["ip", "netns", "exec", spec.netns, *spec.argv(image)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 10
    while not spec.qmp_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            lines = log_path.read_text(errors="replace").strip().splitlines() or ["no output"]
            raise LabError(f"QEMU {spec.name} failed to start: {lines[-1]}")
        time.sleep(0.01)
    return proc.pid


def wait_ready(serial_path: Path, timeout: float = 60.0, pid: int | None = None) -> float:
    """Wait for the guest's ready marker on the serial log; returns seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if READY_MARKER in serial_path.read_text(errors="replace"):
                return time.monotonic() - t0
        except FileNotFoundError:
            pass
        if pid is not None and not alive(pid):
            raise LabError(f"QEMU pid {pid} exited while the guest was booting")
        time.sleep(0.05)
    raise LabError(f"guest did not boot within {timeout:.0f} s (no ready marker in {serial_path})")


def alive(pid: int) -> bool:
    """True while PID runs; a zombie (exited, waiting for init to reap it) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def is_our_qemu(pid: int, name: str) -> bool:
    """True when PID is still the QEMU we started (guards against PID reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(cmdline)
        and Path(cmdline[0].decode()).name == QEMU
        and name.encode() in b"".join(cmdline)
    )


def kill(pid: int, name: str, timeout: float = 5.0) -> None:
    """Terminate a QEMU we started (only if PID still is that QEMU), SIGKILL after timeout."""
    if not is_our_qemu(pid, name):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.01)


def choose_accel(netns: str, image: GuestImage, workdir: Path, timeout: float = 12.0) -> str:
    """'kvm' only if a bounded boot attempt under KVM reaches the ready marker, else 'tcg'.

    /dev/kvm may exist yet be unusable (software-nested): never assume it works. The verdict is
    cached per QEMU binary and guest kernel.
    """
    if not os.path.exists("/dev/kvm"):
        return "tcg"
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise HostError(f"{QEMU} not found: install the Debian package qemu-system-x86")
    key = f"{os.stat(qemu).st_mtime_ns}:{image.kernel}"
    cache = CACHE_DIR / "accel.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return str(cached["accel"])
    except (OSError, ValueError):
        pass
    name = f"{netns}-kvmprobe"
    spec = VmSpec(
        name=name,
        netns=netns,
        nics=[],
        qmp_path=workdir / "kvmprobe.qmp",
        serial_path=workdir / "kvmprobe.serial",
        pidfile=workdir / "kvmprobe.pid",
        accel="kvm",
    )
    accel = "tcg"
    pid = None
    try:
        pid = start(spec, image)
        wait_ready(spec.serial_path, timeout, pid)
        accel = "kvm"
    except LabError:
        pass
    finally:
        if pid is not None:
            kill(pid, name, timeout=2)
        for p in (spec.qmp_path, spec.serial_path, spec.pidfile):
            p.unlink(missing_ok=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "accel": accel}))
    return accel
