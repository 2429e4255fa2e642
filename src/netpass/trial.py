"""One measured migration in the lab: probe running, announces sniffed, driver timed.

The probe runs in the client namespace for the whole trial (a baseline before the migration and
a tail after it); announces are captured on the switch port of the destination host, where the
learning bridge sees them, not with a sniffer on 'any'.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from netpass import lab
from netpass.datapath.capture import ETH_P_ALL, SO_TIMESTAMPNS, BpfInsn, attach_filter
from netpass.datapath.netns import in_netns
from netpass.errors import LabError
from netpass.report import RunRecord
from netpass.results import MigrationTiming, ProbeData

ETH_P_RARP = 0x8035
ETH_P_ARP = 0x0806


def announce_filter(mac: bytes) -> list[BpfInsn]:
    """Classic BPF: only ARP/RARP frames from MAC reach the socket. The sniffed switch port
    also carries the migration stream; copying each of its packets to this socket and waking
    a Python thread for it took CPU from the QEMUs under test, in stock and netpass runs alike."""
    hi, lo = struct.unpack("!IH", mac)
    return [
        (0x28, 0, 0, 12),  # ldh [12]            ethertype
        (0x15, 1, 0, ETH_P_RARP),  # jeq RARP -> mac
        (0x15, 0, 4, ETH_P_ARP),  # jeq ARP -> mac, else drop
        (0x20, 0, 0, 6),  # ld [6]              source MAC, first 4 bytes
        (0x15, 0, 2, hi),
        (0x28, 0, 0, 10),  # ldh [10]            last 2 bytes
        (0x15, 1, 0, lo),  # -> keep
        (0x06, 0, 0, 0),  # drop
        (0x06, 0, 0, 0xFFFF),  # keep
    ]


class AnnounceSniffer:
    """Records when frames from the VM's MAC (RARP/ARP announces) cross a switch port."""

    def __init__(self, netns_name: str, ifname: str, mac: str) -> None:
        # Protocol 0 receives nothing before bind(), so the filter is in place first.
        with in_netns(netns_name):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        attach_filter(self.sock, announce_filter(bytes.fromhex(mac.replace(":", ""))))
        self.sock.bind((ifname, ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setblocking(False)
        self.times: list[int] = []
        self.frames_read = 0  # what the kernel filter let through
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AnnounceSniffer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if not r:
                continue
            with contextlib.suppress(BlockingIOError):
                while True:
                    _data, anc, _flags, _addr = self.sock.recvmsg(2048, 64)
                    self.frames_read += 1  # only the VM's ARP/RARP: announce_filter
                    t = time.time_ns()
                    for level, kind, raw in anc:
                        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                            sec, nsec = struct.unpack("qq", raw[:16])
                            t = sec * 1_000_000_000 + nsec
                    self.times.append(t)


@contextlib.contextmanager
def probe(
    st: lab.LabState, rate: int, nic: int = 0, target: str | None = None
) -> Iterator[Callable[[], ProbeData]]:
    """Run the ICMP probe against the VM (or TARGET); the yielded function stops it and
    returns its data."""
    from netpass.probe import read_probe

    out = Path(tempfile.mkdtemp(prefix="netpass-probe-")) / "probe.json"
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            st.client_ns,
            sys.executable,
            "-m",
            "netpass.probe",
            "--target",
            target or st.vm_ip(nic),
            "--rate",
            str(rate),
            "--duration",
            "3600",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PROBE-STARTED"):
        proc.kill()
        raise LabError(f"probe did not start: {proc.stderr.read() if proc.stderr else line}")
    result: list[ProbeData] = []

    def finish() -> ProbeData:
        if not result:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            if proc.returncode != 0:
                raise LabError(f"probe failed: {err.strip()}")
            result.append(read_probe(out))
            out.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                os.rmdir(out.parent)
        return result[0]

    try:
        yield finish
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


Driver = Callable[[dict[str, Any]], Coroutine[Any, Any, MigrationTiming]]


def run_trial(
    st: lab.LabState,
    label: str,
    rate: int,
    driver: Driver,
    baseline_s: float = 1.0,
    tail_s: float = 1.0,
) -> RunRecord:
    """Probe + sniffer around one migration driven by `driver(status)`; updates the lab state."""
    status = st.status()
    dst_host = "b" if st.vm_host == "a" else "a"
    with (
        probe(st, rate) as finish,
        AnnounceSniffer(st.switch_ns, f"p-h{dst_host}", st.vm_mac(0)) as sniffer,
    ):
        time.sleep(baseline_s)
        timing = asyncio.run(driver(status))
        lab.migrated(st)
        time.sleep(tail_s)
        data = finish()
    if timing.dst_resume_ns is not None:
        timing.announce_ns = [t for t in sniffer.times if t >= timing.dst_resume_ns - 10**9]
    return RunRecord(label, timing, data)
