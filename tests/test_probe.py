from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import netpass
from netpass.analysis import analyze
from netpass.errors import UsageError
from netpass.probe import ICMP_ECHO_REQUEST, TAG, _Packets, read_probe, read_probe_meta
from netpass.results import ProbeData

SRC_DIR = str(Path(netpass.__file__).resolve().parents[1])
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, raw sockets)")


def probe_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC_DIR, env.get("PYTHONPATH")) if p)
    return env


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class NsPair:
    ns: str  # where the prober runs
    peer_ns: str
    addr: str
    peer_addr: str
    peer_dev: str


@pytest.fixture
def ns_pair() -> Iterator[NsPair]:
    """Two namespaces joined by a veth pair, addresses in 10.213.x.0/30; always deleted."""
    pid = os.getpid()
    x = pid % 250
    pair = NsPair(f"npa-{pid}", f"npa-{pid}-peer", f"10.213.{x}.1", f"10.213.{x}.2", "npa-p")
    names = (pair.ns, pair.peer_ns)
    try:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)  # stale leftovers
            ip("netns", "add", name)
        veth = ["link", "add", "npa-a", "type", "veth", "peer", "name", pair.peer_dev]
        ip("-n", pair.ns, *veth, "netns", pair.peer_ns)
        ip("-n", pair.ns, "addr", "add", f"{pair.addr}/30", "dev", "npa-a")
        ip("-n", pair.peer_ns, "addr", "add", f"{pair.peer_addr}/30", "dev", pair.peer_dev)
        for name, dev in ((pair.ns, "npa-a"), (pair.peer_ns, pair.peer_dev)):
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "link", "set", dev, "up")
        yield pair
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def start_probe(ns: str | None, out: Path, target: str, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "netpass.probe", "--target", target, "--out", str(out), *args]
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=probe_env()
    )


def wait_started(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("PROBE-STARTED "), (line, proc.stderr and proc.stderr.read())
    return int(line.split()[1])


@needs_root
def test_clean_run(ns_pair: NsPair, tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    proc = start_probe(ns_pair.ns, out, ns_pair.peer_addr, "--rate", "2000", "--duration", "1")
    t0 = wait_started(proc)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    data = read_probe(out)
    assert data.target == ns_pair.peer_addr and data.rate_pps == 2000
    assert abs(len(data.send_ns) - 2000) <= 100
    assert t0 <= data.send_ns[0]
    span_s = (data.send_ns[-1] - data.send_ns[0]) / 1e9
    assert abs((len(data.send_ns) - 1) / span_s - 2000) <= 100  # the rate, not just the count
    s = analyze(data)
    assert s.received == s.sent and s.lost == 0 and s.duplicates == 0
    assert s.rtt.count == s.sent
    assert s.rtt.p50_ms is not None and 0 < s.rtt.p50_ms < 5
    assert s.rtt.max_ms is not None and s.rtt.max_ms < 200
    meta = read_probe_meta(out)
    assert meta["stop_reason"] == "duration" and meta["send_errors"] == 0
    assert meta["max_late_ns"] >= 0


@needs_root
def test_peer_down_all_lost(ns_pair: NsPair, tmp_path: Path) -> None:
    ip("-n", ns_pair.peer_ns, "link", "set", ns_pair.peer_dev, "down")
    out = tmp_path / "probe.json"
    proc = start_probe(
        ns_pair.ns, out, ns_pair.peer_addr, "--rate", "1000", "--duration", "0.5", "--grace", "0.3"
    )
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    s = analyze(read_probe(out))
    assert s.sent == 500
    assert (s.received, s.lost) == (0, 500)
    assert len(s.lost_runs) == 1 and s.lost_runs[0].count == 500


@needs_root
def test_sigterm_stops_early(ns_pair: NsPair, tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    proc = start_probe(
        ns_pair.ns, out, ns_pair.peer_addr, "--rate", "1000", "--duration", "60", "--grace", "0.5"
    )
    wait_started(proc)
    time.sleep(0.5)
    t_sig = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    elapsed = time.monotonic() - t_sig
    assert proc.returncode == 0, err
    assert 0.4 < elapsed < 3  # waited the grace period, then wrote and left
    s = analyze(read_probe(out))
    assert 200 < s.sent < 3000
    assert s.lost == 0
    assert read_probe_meta(out)["stop_reason"] == "signal"


@pytest.mark.parametrize(
    "args",
    [
        ["--target", "10.0.0.300"],
        ["--target", "not-an-ip"],
        ["--target", "10.0.0.2", "--rate", "0"],
        ["--target", "10.0.0.2", "--rate", "50001"],
        ["--target", "10.0.0.2", "--rate", "fast"],
        ["--target", "10.0.0.2", "--duration", "0"],
        ["--target", "10.0.0.2", "--payload", "4"],
        ["--target", "10.0.0.2", "--out", "/nonexistent-npa-dir/p.json"],
        ["--target", "10.0.0.2", "--out", "/"],
        ["--rate", "1000"],
    ],
)
def test_cli_bad_input(args: list[str], tmp_path: Path) -> None:
    base = {"--rate": "1000", "--duration": "1", "--out": str(tmp_path / "p.json")}
    opts = dict(base)
    opts.update(dict(zip(args[::2], args[1::2], strict=True)))
    argv = [x for kv in opts.items() for x in kv]
    proc = subprocess.run(
        [sys.executable, "-m", "netpass.probe", *argv],
        capture_output=True,
        text=True,
        env=probe_env(),
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netpass.probe: "), proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "p.json").exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def _ref_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.mark.parametrize("payload", [16, 56, 57, 1400])
@pytest.mark.parametrize("seq", [0, 1, 0xFFFF, 0x10000, 0x1_2345_6789, 2**64 - 1])
def test_packet_checksum_and_layout(payload: int, seq: int) -> None:
    pkt = _Packets(0x1234, b"abcd", payload).build(seq)
    assert len(pkt) == 8 + payload
    assert _ref_checksum(pkt) == 0  # a valid ICMP checksum sums to 0xffff
    kind, code, _, ident, icmp_seq = struct.unpack_from("!BBHHH", pkt)
    assert (kind, code, ident, icmp_seq) == (ICMP_ECHO_REQUEST, 0, 0x1234, seq & 0xFFFF)
    _tag, _nonce, seq_out = TAG.unpack_from(pkt, 8)
    assert seq_out == seq


def test_read_probe(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    data = ProbeData("10.0.0.2", 100, 56, [1, 2, 3], [(0, 5), (2, 9)])
    path.write_text(json.dumps(data.to_dict()))
    assert read_probe(path) == data
    assert read_probe_meta(path) == {}
    with pytest.raises(UsageError):
        read_probe(tmp_path / "missing.json")
    path.write_text("[1,")
    with pytest.raises(UsageError):
        read_probe(path)
