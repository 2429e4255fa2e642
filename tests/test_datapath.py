"""Kernel data path on real taps, veths and a bridge in a scratch network namespace (root)."""

from __future__ import annotations

import itertools
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from netpass.datapath import tapfd, tc, tcnl
from netpass.datapath.caps import KernelCaps, detect_caps
from netpass.datapath.capture import CaptureDevice, CaptureSocket
from netpass.datapath.ethtool import offloads_on
from netpass.datapath.inject import Injector
from netpass.datapath.netns import in_netns, iproute
from netpass.errors import DatapathError
from netpass.trial import ETH_P_ARP, ETH_P_RARP, AnnounceSniffer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, taps, tc)")

GUEST_MAC = bytes.fromhex("525400123456")
SENDER_MAC = bytes.fromhex("020000000001")
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing else on the host sends it
MAGIC = b"NPD"
HDR_LEN = 12  # virtio-net header size QEMU uses
TAP, BRIDGE, SEND_V, PORT_V, CAP_BASE = "npdtap0", "npdbr0", "npdv0", "npdv1", "npdcap"

_ns_counter = itertools.count()


def frame(kind: bytes, seq: int, size: int = 60) -> bytes:
    head = GUEST_MAC + SENDER_MAC + struct.pack("!H", ETHERTYPE) + MAGIC + kind
    return (head + struct.pack("!I", seq)).ljust(size, b"\xa5")


def parse(data: bytes) -> tuple[str, int] | None:
    """(kind, seq) of a test frame, None for anything else the kernel may emit."""
    if len(data) < 22 or data[12:14] != struct.pack("!H", ETHERTYPE) or data[14:17] != MAGIC:
        return None
    return data[17:18].decode(), struct.unpack_from("!I", data, 18)[0]


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True


@contextmanager
def scratch_netns() -> Iterator[str]:
    """A fresh namespace `npd-dp<pid>-<n>` with IPv6 off (no router solicitations or MLD)."""
    name = f"npd-dp{os.getpid()}-{next(_ns_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with in_netns(name):
            for conf in ("all", "default"):
                with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                    f.write("1")
            with iproute() as ipr:
                ipr.link("set", ifname="lo", state="up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A scratch namespace; the test thread runs inside it."""
    with scratch_netns() as name, in_netns(name):
        yield name


@pytest.fixture
def peer_netns() -> Iterator[str]:
    """A second namespace for the sender, as if frames came from another host: crossing
    namespaces orphans them, so held frames are not charged to the sending socket."""
    with scratch_netns() as name:
        yield name


@dataclass
class Reader:
    """The 'VM': reads the tap fd like QEMU does and records test frames in arrival order."""

    fd: int
    hdr_len: int
    start_after: float = 0.0
    got: list[tuple[str, int]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Reader:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        time.sleep(self.start_after)
        os.set_blocking(self.fd, False)  # our own tap: nobody else shares the flag
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        while not self._stop.is_set():
            if not p.poll(20):
                continue
            while True:
                try:
                    data = os.read(self.fd, 70000)[self.hdr_len :]
                except BlockingIOError:
                    break
                key = parse(data)
                if key is not None:
                    self.raw.append(data)
                    self.got.append(key)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def of(self, kind: str) -> list[int]:
        return [s for k, s in self.got if k == kind]


class Collector:
    """Drains a CaptureSocket in a thread."""

    def __init__(self, sock: CaptureSocket) -> None:
        self.sock = sock
        self.got: list[tuple[str, int]] = []
        self.raw: list[bytes] = []
        self.ts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.wait(0.02):
                continue
            for f in self.sock.recv_many(256):
                key = parse(f.data)
                if key is not None:
                    self.raw.append(f.data)
                    self.got.append(key)
                    self.ts.append(f.ts_ns)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def of(self, kind: str) -> list[int]:
        return [s for k, s in self.got if k == kind]


class Sender:
    """Sends test frames into the bridge through a veth, paced, from one pinned CPU (frames
    queued on two CPUs' backlogs could be reordered before they reach the bridge). It uses
    the bypass injector only as a convenient paced sender: the veth has no qdisc anyway."""

    def __init__(self, netns: str, count: int, per_ms: float, kind: bytes = b"S") -> None:
        self.netns, self.count, self.per_ms, self.kind = netns, count, per_ms, kind
        self.sent = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sender:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
            # Held frames stay charged to the sending socket (even across namespaces).
            inj = Injector(SEND_V, pace_per_ms=self.per_ms, sndbuf=64 << 20, netns=self.netns)
            with inj:
                for i in range(self.count):
                    inj.send(frame(self.kind, i))
                    self.sent = i + 1
        except BaseException as e:
            self.error = e

    def join(self) -> None:
        self._thread.join(30)
        assert self.error is None, self.error
        assert self.sent == self.count


@dataclass
class Lab:
    netns: str
    peer_netns: str
    caps: KernelCaps
    tap_fd: int
    reader: Reader
    cap_dev: CaptureDevice
    cap_sock: CaptureSocket
    collector: Collector


@pytest.fixture
def lab(netns: str, peer_netns: str) -> Iterator[Lab]:
    """sender veth (in PEER_NETNS) -> bridge -> tap, read by a Reader thread; a capture
    device and socket."""
    caps = detect_caps()
    fd = tapfd.open_tap(TAP, hdr_len=HDR_LEN)
    reader = Reader(fd, HDR_LEN).start()
    cap_dev = CaptureDevice(CAP_BASE, caps).create()
    cap_sock = CaptureSocket(cap_dev.ifname)
    collector = Collector(cap_sock)
    try:
        with iproute() as ipr:
            ipr.link("add", ifname=BRIDGE, kind="bridge")
            peer_fd = os.open(f"/run/netns/{peer_netns}", os.O_RDONLY)
            try:
                ipr.link(
                    "add", ifname=PORT_V, kind="veth", peer={"ifname": SEND_V, "net_ns_fd": peer_fd}
                )
            finally:
                os.close(peer_fd)
            br = ipr.link_lookup(ifname=BRIDGE)[0]
            for name in (TAP, PORT_V):
                ipr.link("set", ifname=name, master=br)
            for name in (BRIDGE, TAP, PORT_V):
                ipr.link("set", ifname=name, state="up")
        with iproute(peer_netns) as ipr:
            ipr.link("set", ifname=SEND_V, state="up")
        tc.ensure_clsact(TAP)
        yield Lab(netns, peer_netns, caps, fd, reader, cap_dev, cap_sock, collector)
    finally:
        collector.stop()
        cap_sock.close()
        reader.stop()
        os.close(fd)
        cap_dev.delete()


def settle(*lists: Callable[[], int], quiet: float = 0.2, timeout: float = 10) -> None:
    """Wait until the given counters stop growing for QUIET seconds."""
    deadline = time.monotonic() + timeout
    last = [f() for f in lists]
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = [f() for f in lists]
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= quiet:
            return


# --- namespaces


def _ns_inode(path: str = "/proc/thread-self/ns/net") -> int:
    return os.stat(path).st_ino


def test_in_netns_moves_only_the_calling_thread_and_back(netns: str, peer_netns: str) -> None:
    inside, other = _ns_inode(), _ns_inode(f"/run/netns/{peer_netns}")
    assert inside == _ns_inode(f"/run/netns/{netns}") != other
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(_ns_inode()))
    t.start()
    t.join()
    assert seen == [inside]  # threads started inside inherit the namespace
    with in_netns(f"/run/netns/{peer_netns}"):
        assert _ns_inode() == other
        with iproute(netns) as ipr:  # a netlink socket opened in another namespace
            assert ipr.link_lookup(ifname="lo")
            ipr.link("add", ifname="npdnsv0", kind="veth", peer="npdnsv1")
        assert _ns_inode() == other
    assert _ns_inode() == inside
    with iproute() as ipr:
        assert ipr.link_lookup(ifname="npdnsv0")  # created in NETNS, not where the thread was
    with pytest.raises(DatapathError, match="not found"), in_netns("npd-no-such-namespace"):
        pass
    with pytest.raises(RuntimeError), in_netns(peer_netns):
        raise RuntimeError("the block fails")
    assert _ns_inode() == inside  # restored after an exception too


# --- capabilities


def _tries(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def test_caps_match_independent_tc_and_ip(netns: str) -> None:
    caps = detect_caps()
    assert detect_caps() is caps  # cached per process
    assert _tries(["ip", "link", "add", "npdq0", "type", "veth", "peer", "name", "npdq1"])
    assert caps.veth
    assert caps.dummy == _tries(["ip", "link", "add", "npdqd", "type", "dummy"])
    assert caps.clsact == _tries(["tc", "qdisc", "add", "dev", "npdq0", "clsact"])
    match = ["u32", "match", "u32", "0", "0"]
    add = ["tc", "filter", "add", "dev", "npdq0", "egress", "protocol", "all"]
    assert caps.u32 == _tries([*add, "prio", "1", *match])
    assert caps.matchall == _tries([*add, "prio", "2", "matchall"])
    mirred = ["action", "mirred", "egress", "redirect", "dev", "npdq1"]
    assert caps.mirred == _tries([*add, "prio", "3", *match, *mirred])
    assert caps.plug == _tries(["tc", "qdisc", "add", "dev", "npdq1", "root", "plug"])
    tbf = ["tbf", "rate", "1mbit", "burst", "2k", "latency", "1s"]
    assert caps.tbf == _tries(["tc", "qdisc", "add", "dev", "lo", "root", *tbf])
    assert caps.capture_kind == ("dummy" if caps.dummy else "veth")
    assert caps.match_all == ("matchall" if caps.matchall else "u32")
    assert caps.hold_kind == ("plug" if caps.plug else "tbf")
    caps.require()


def test_caps_on_this_host_pick_the_fallbacks() -> None:
    """This host kernel has no dummy, cls_matchall or sch_plug (see the design notes)."""
    config = "/proc/config.gz"
    if not os.path.exists(config):
        pytest.skip("no /proc/config.gz to know what this kernel lacks")
    text = subprocess.run(["zcat", config], capture_output=True, text=True).stdout
    if "CONFIG_DUMMY=" in text or "CONFIG_NET_SCH_PLUG=" in text:
        pytest.skip("kernel has dummy or sch_plug: not the fallback host")
    caps = detect_caps()
    assert (caps.capture_kind, caps.match_all, caps.hold_kind) == ("veth", "u32", "tbf")


def test_tbf_closed_parameters_can_never_dequeue() -> None:
    p = tcnl.tbf_closed(tc.DEFAULT_HOLD_LIMIT)
    for length in (14, 60, 1514, 9018, p.max_size):
        assert tcnl.l2t_ns(p.rate, p.mpu, length) > p.buffer_ns
    assert p.frame_cost_ns - p.buffer_ns == pytest.approx(tcnl.HOLD_GAP_NS, abs=64)
    assert p.max_size >= 65000


# --- capture device and redirect


def test_capture_device_has_offloads_off(lab: Lab) -> None:
    assert not any(offloads_on(lab.cap_dev.ifname).values())


def test_redirect_exactly_once_in_order(lab: Lab) -> None:
    n = 6000
    sender = Sender(lab.peer_netns, n, per_ms=10).start()
    assert wait_until(lambda: sender.sent >= 1500, 5)
    tc.add_egress_redirect(TAP, lab.cap_dev.ifname, caps=lab.caps)
    after_add = sender.sent + 1  # this frame and later ones were sent after the add returned
    assert wait_until(lambda: sender.sent >= 4000, 5)
    assert tc.del_egress_redirect(TAP)
    after_del = sender.sent + 1
    sender.join()
    settle(lambda: len(lab.reader.got), lambda: len(lab.collector.got))

    direct, captured = lab.reader.of("S"), lab.collector.of("S")
    assert sorted(direct + captured) == list(range(n))  # every frame exactly once
    assert direct == sorted(direct) and captured == sorted(captured)  # in order
    # The redirected stretch is one contiguous block: nothing sent after the add returned
    # reached the reader until the delete, everything sent after the delete returned did.
    assert captured == list(range(captured[0], captured[-1] + 1))
    assert captured[0] <= after_add < captured[-1] < after_del
    assert lab.cap_sock.stats()[1] == 0
    # Captured bytes are the frames as sent.
    assert lab.collector.raw[0] == frame(b"S", captured[0])
    assert all(t > 0 for t in lab.collector.ts)
    assert lab.collector.ts == sorted(lab.collector.ts)


def test_redirect_refuses_duplicate_and_missing_clsact(lab: Lab) -> None:
    tc.add_egress_redirect(TAP, lab.cap_dev.ifname, caps=lab.caps, slot=2)
    with pytest.raises(DatapathError, match="already has a netpass filter"):
        tc.add_egress_redirect(TAP, lab.cap_dev.ifname, caps=lab.caps, slot=2)
    assert tc.egress_filter_prios(TAP) == {tc.PRIO_BASE + 2}
    assert tc.del_egress_redirect(TAP, slot=2)
    assert not tc.del_egress_redirect(TAP, slot=2)
    with pytest.raises(DatapathError, match="clsact"):
        tc.add_egress_redirect(PORT_V, lab.cap_dev.ifname, caps=lab.caps)


def test_bypass_injection_passes_redirect_and_closed_hold(lab: Lab) -> None:
    hold = tc.Hold(TAP, lab.caps)
    hold.install_open()
    tc.add_egress_redirect(TAP, lab.cap_dev.ifname, caps=lab.caps)
    with Injector(TAP) as inj:
        for i in range(100):
            inj.send(frame(b"I", i))
        hold.close()
        for i in range(100, 200):
            inj.send(frame(b"I", i))
    assert wait_until(lambda: len(lab.reader.of("I")) >= 200, 5)
    assert lab.reader.of("I") == list(range(200))
    assert lab.reader.raw[0] == frame(b"I", 0)
    assert lab.collector.of("I") == []  # bypass skipped the redirect
    # Frames through the normal path are still redirected, not held (clsact runs first).
    with _plain_socket(TAP) as s:
        s.send(frame(b"N", 0))
    assert wait_until(lambda: lab.collector.of("N") == [0], 5)
    tc.del_egress_redirect(TAP)
    hold.remove()


# --- hold


def _hold_cases() -> list[tuple[str, str]]:
    caps = detect_caps() if os.geteuid() == 0 else None
    cases = [("tbf", "paced"), ("tbf", "deep-queue"), ("plug", "deep-queue")]
    return [(k, r) for k, r in cases if caps is not None and getattr(caps, k)]


@pytest.mark.parametrize(("kind", "release"), _hold_cases())
def test_hold_keeps_frames_and_releases_in_order(lab: Lab, kind: str, release: str) -> None:
    n, inj_n = 5000, 300
    if release == "deep-queue":
        tc.set_txqueuelen(TAP, n + 1000)  # before the hold: the change empties qdiscs
    hold = tc.Hold(TAP, lab.caps, kind=kind)  # type: ignore[arg-type]
    hold.install_open()
    sender = Sender(lab.peer_netns, n, per_ms=5).start()  # 5k frames/s for one second
    assert wait_until(lambda: sender.sent >= 1000, 5)
    hold.close()
    after_close = sender.sent + 1
    assert wait_until(lambda: sender.sent >= 3000, 5), (sender.sent, sender.error)
    with Injector(TAP) as inj:  # "old" frames delivered while newer ones are held
        for i in range(inj_n):
            inj.send(frame(b"I", i))
    sender.join()
    settle(lambda: len(lab.reader.got))
    time.sleep(0.3)  # a leaking hold would let frames through meanwhile

    passed = lab.reader.of("S")
    assert passed == list(range(len(passed)))
    assert len(passed) <= after_close  # nothing sent after close() returned got through
    assert lab.reader.of("I") == list(range(inj_n))
    st = hold.stats()
    # The qdisc may also hold a frame or two of the kernel's own (IGMP reports of the bridge).
    assert 0 <= st.qlen - (n - len(passed)) <= 3 and st.drops == 0

    t0 = time.monotonic()
    if release == "paced":
        # 10/ms: the test's Python reader must keep a 1000-frame tap queue from filling even
        # when the machine is busy (at 20/ms a 50 ms stall of the reader was enough).
        hold.open(pace_per_ms=10)
    else:
        with pytest.raises(DatapathError, match="held frames"):
            tc.set_txqueuelen(TAP, n + 2000)
        hold.open()
    assert wait_until(lambda: len(lab.reader.of("S")) == n, 5), tc.tx_dropped(TAP)
    release_s = time.monotonic() - t0
    expected = [("S", i) for i in range(len(passed))]
    expected += [("I", i) for i in range(inj_n)]
    expected += [("S", i) for i in range(len(passed), n)]
    assert lab.reader.got == expected
    assert tc.tx_dropped(TAP) == 0
    assert hold.wait_drained(1)
    assert release_s < 1.0
    hold.remove()
    with iproute() as ipr:
        index = ipr.link_lookup(ifname=TAP)[0]
        roots = [m for m in tcnl.dump_qdiscs(ipr, index) if m["parent"] == tcnl.TC_H_ROOT]
    assert all(m["handle"] != tc.HOLD_HANDLE for m in roots)


def test_unpaced_release_beyond_tap_queue_is_lost(netns: str) -> None:
    """Why release is paced or the tap queue enlarged: the tap drops what does not fit."""
    fd = tapfd.open_tap("npdtapu", hdr_len=HDR_LEN)
    try:
        with iproute() as ipr:
            ipr.link("set", ifname="npdtapu", state="up", txqlen=100)
        hold = tc.Hold("npdtapu", kind="tbf")
        hold.install_open()
        hold.close()
        with _plain_socket("npdtapu") as s:
            for i in range(300):
                s.send(frame(b"S", i))
        hold.open()  # nobody reads: 100 fit the tap queue, the rest is dropped
        assert wait_until(lambda: tc.tx_dropped("npdtapu") >= 200, 2)
        assert [parse(f) for f in tapfd.drain(fd, HDR_LEN)] == [("S", i) for i in range(100)]
    finally:
        os.close(fd)


def _no_pyroute2(netns: str | None = None) -> None:
    raise AssertionError("pyroute2 used")


@contextmanager
def _plain_socket(ifname: str) -> Iterator[socket.socket]:
    """AF_PACKET sender through the normal egress path (clsact, root qdisc). Held frames stay
    charged to it, hence the large send buffer."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
        s.setsockopt(socket.SOL_SOCKET, 32, 256 << 20)  # SO_SNDBUFFORCE
        s.bind((ifname, 0))
        yield s


@contextmanager
def _tap_reader(name: str) -> Iterator[Reader]:
    """A tap (up) whose frames a Reader collects, as a guest's NIC would take them."""
    fd = tapfd.open_tap(name, hdr_len=HDR_LEN)
    reader = Reader(fd, HDR_LEN).start()
    try:
        with iproute() as ipr:
            ipr.link("set", ifname=name, state="up")
        yield reader
    finally:
        reader.stop()
        os.close(fd)


def test_tbf_hold_first_frame_and_long_hold_do_not_leak(netns: str) -> None:
    """The classic TBF-as-plug leak: a closed TBF still has a full bucket. Ours must not."""
    with _tap_reader("npdtapl") as reader:
        hold = tc.Hold("npdtapl", kind="tbf")
        hold.install_open()
        hold.close()
        with _plain_socket("npdtapl") as s:
            s.send(frame(b"S", 0, 14 + 1500))  # full size: would drain a naive bucket
            s.send(frame(b"S", 1, 60))
            time.sleep(2.0)
            assert reader.got == []
            assert hold.stats().qlen == 2
            hold.open()
            assert wait_until(lambda: len(reader.got) == 2, 1)
            hold.close()  # a second close after traffic passed holds too
            s.send(frame(b"S", 2, 60))
            time.sleep(0.3)
            assert reader.of("S") == [0, 1]
            hold.open()
            assert wait_until(lambda: reader.of("S") == [0, 1, 2], 1)
        hold.remove()


def test_prepared_close_holds_and_a_stale_one_falls_back(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold closed by the change encoded in advance holds like the full path does; one
    encoded for a tap since re-created (new ifindex) still closes the new tap's hold."""
    kind = detect_caps().hold_kind
    with _tap_reader("npdtapp") as reader:
        hold = tc.Hold("npdtapp", kind=kind)
        hold.install_open()
        hold.prepare_close()
        with monkeypatch.context() as m:  # no pyroute2 on this path (that one takes ~1 ms)
            m.setattr(tc, "iproute", _no_pyroute2)
            assert hold.close_prepared()
        assert hold.closed
        with _plain_socket("npdtapp") as s:
            s.send(frame(b"S", 0))
            time.sleep(0.3)
            assert reader.got == [] and hold.stats().qlen == 1
            hold.open()
            assert wait_until(lambda: reader.of("S") == [0], 1)
    fd = tapfd.open_tap("npdtapp", hdr_len=HDR_LEN)  # same name, new interface
    try:
        with iproute() as ipr:
            ipr.link("set", ifname="npdtapp", state="up")
        tc.Hold("npdtapp", kind=kind).install_open()
        # The prepared change names the old ifindex: the kernel refuses it, and the caller
        # that must not block (an agent's event loop) hears so; the full path closes it.
        assert not hold.close_prepared() and not hold.closed
        hold.close()
        with _plain_socket("npdtapp") as s:
            s.send(frame(b"S", 1))
        time.sleep(0.05)
        assert not tapfd.queued(fd) and hold.stats().qlen == 1
        hold.drop_prepared()
        hold.remove()
        assert wait_until(lambda: tapfd.queued(fd), 1)
    finally:
        os.close(fd)


def test_tbf_hold_20000_frames_paced_release(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large hold: nothing dropped by the qdisc, and a paced release the reader can follow
    although the tap's own queue (txqueuelen) is far smaller than the hold. Waiting for it
    to drain looks at the queue about every 10 ms, not every millisecond."""
    looks = []
    real_root = tc._root_qdisc
    monkeypatch.setattr(
        tc, "_root_qdisc", lambda ipr, index: looks.append(1) or real_root(ipr, index)
    )
    with _tap_reader("npdtaph") as reader:
        # Still 5x smaller than the hold, but a busy machine may stall the Python reader for
        # 200 ms without the tap dropping anything (at 1000 frames it once dropped some).
        tc.set_txqueuelen("npdtaph", 4000)
        hold = tc.Hold("npdtaph", kind="tbf")
        hold.install_open()
        hold.close()
        n = 20000
        with _plain_socket("npdtaph") as s:
            for i in range(n):
                s.send(frame(b"S", i, 1514))
        st = hold.stats()
        assert (st.qlen, st.drops) == (n, 0)
        assert reader.got == []
        t0 = time.monotonic()
        hold.open(pace_per_ms=20)
        assert hold.paced
        looks.clear()
        assert hold.wait_drained(10)
        took = time.monotonic() - t0
        assert len(looks) <= took / tc.DRAIN_POLL_MAX_S + 5, (len(looks), took)
        assert wait_until(lambda: len(reader.got) == n, 10), tc.tx_dropped("npdtaph")
        assert reader.of("S") == list(range(n))
        assert took >= n / 20 / 1000 * 0.9  # really paced (~1 s)
        assert tc.tx_dropped("npdtaph") == 0
        assert hold.wait_drained(1)
        hold.open()
        assert not hold.paced
        hold.remove()


def test_hold_refuses_foreign_root_qdisc(netns: str) -> None:
    fd = tapfd.open_tap("npdtapf")
    try:
        subprocess.run(
            ["tc", "qdisc", "add", "dev", "npdtapf", "root", "handle", "1:", "htb"], check=True
        )
        with pytest.raises(DatapathError, match="not netpass's"):
            tc.Hold("npdtapf", kind="tbf").install_open()
    finally:
        os.close(fd)


# --- injection


def test_inject_retries_on_full_tap_queue(netns: str) -> None:
    fd = tapfd.open_tap("npdtapq", hdr_len=HDR_LEN)
    try:
        with iproute() as ipr:
            ipr.link("set", ifname="npdtapq", state="up", txqlen=16)
        with Injector("npdtapq", retry_for=0.2) as inj:
            for i in range(16):
                inj.send(frame(b"I", i))
            t0 = time.monotonic()
            with pytest.raises(DatapathError, match="stayed full"):
                inj.send(frame(b"I", 16))
            assert time.monotonic() - t0 >= 0.2
            assert inj.retries > 0
        assert [parse(f[HDR_LEN:]) for f in tapfd.drain(fd, 0)] == [("I", i) for i in range(16)]

        reader = Reader(fd, HDR_LEN, start_after=0.1).start()
        try:
            with Injector("npdtapq", retry_for=2) as inj:
                for i in range(500):
                    inj.send(frame(b"J", i))
                assert inj.retries > 0  # the queue was full and retrying delivered anyway
            assert wait_until(lambda: len(reader.of("J")) == 500, 5)
            assert reader.of("J") == list(range(500))
        finally:
            reader.stop()
    finally:
        os.close(fd)


def test_inject_pacing(netns: str) -> None:
    with _tap_reader("npdtapp") as reader:
        with Injector("npdtapp", pace_per_ms=2) as inj:
            t0 = time.monotonic()
            inj.send_many(frame(b"P", i) for i in range(400))
            took = time.monotonic() - t0
        assert 0.17 <= took <= 0.5  # 400 frames at 2/ms ~ 0.2 s
        assert wait_until(lambda: reader.of("P") == list(range(400)), 2)


def test_inject_pace_can_start_mid_stream(netns: str) -> None:
    """The destination's catch-up: a first burst unpaced, then paced, order kept."""
    with _tap_reader("npdtaps") as reader:
        with Injector("npdtaps") as inj:
            inj.send_many(frame(b"S", i) for i in range(32))
            inj.set_pace(2)
            t0 = time.monotonic()
            inj.send_many(frame(b"S", i) for i in range(32, 232))
            took = time.monotonic() - t0
            with pytest.raises(DatapathError):
                inj.set_pace(0)
        assert took >= 0.09  # 200 frames at 2/ms; at most 1 ms worth goes early
        assert wait_until(lambda: reader.of("S") == list(range(232)), 2)


# --- tap fd of another process


_CHILD = """
import sys, time
from netpass.datapath import tapfd
fd = tapfd.open_tap("npdtapc", hdr_len=12, netns=sys.argv[1])
print("ready", fd, flush=True)
sys.stdin.read()
"""


def test_tapfd_copy_queued_and_drain(netns: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, netns],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    copy = -1
    try:
        assert child.stdout is not None
        ready = child.stdout.readline().split()
        assert ready[0] == "ready"
        assert tapfd.find_tap_fds(child.pid, "npdtapc") == [int(ready[1])]
        assert tapfd.find_tap_fds(child.pid, "npdtapx") == []
        copy = tapfd.copy_fd(child.pid, int(ready[1]))
        assert tapfd.tap_info(copy)[0] == "npdtapc"
        assert tapfd.vnet_hdr_size(copy) == 12
        with iproute() as ipr:
            ipr.link("set", ifname="npdtapc", state="up")
        assert not tapfd.queued(copy)
        sent = [frame(b"Q", i, 60 + i) for i in range(3)]
        with Injector("npdtapc") as inj:
            inj.send(sent[0])
        assert tapfd.queued(copy)
        assert tapfd.queued(copy)  # polling consumed nothing
        assert tapfd.drain(copy, 12) == [sent[0]]
        assert not tapfd.queued(copy)
        with Injector("npdtapc") as inj:
            inj.send_many(sent[1:])
        assert tapfd.drain(copy, 12, max_frames=1) == [sent[1]]
        assert tapfd.drain(copy, 12) == [sent[2]]
        assert tapfd.drain(copy, 12) == []
    finally:
        if copy >= 0:
            os.close(copy)
        child.kill()
        child.wait(5)


# --- crash recovery


def test_sweep_removes_ours_only_and_releases_held_frames(lab: Lab) -> None:
    other = "npdfx0"
    with iproute() as ipr:
        ipr.link("add", ifname=other, kind="veth", peer="npdfx1")
        o_idx, t_idx = ipr.link_lookup(ifname=other)[0], ipr.link_lookup(ifname=TAP)[0]
        cap_idx = ipr.link_lookup(ifname=lab.cap_dev.ifname)[0]
        tcnl.add_clsact(ipr, o_idx)
        foreign = {tc.PRIO_BASE - 1, tc.PRIO_BASE + tc.PRIO_SLOTS, 100}
        for prio in foreign:  # just outside our range on both sides, and far away
            tcnl.add_filter(ipr, o_idx, prio, lab.caps.match_all, cap_idx)
        tcnl.add_filter(ipr, t_idx, 100, lab.caps.match_all, None)
        tcnl.tbf_set(ipr, o_idx, 0x10000, tcnl.tbf_open(1 << 20), create=True)
    tc.add_egress_redirect(other, lab.cap_dev.ifname, caps=lab.caps, slot=5)
    hold = tc.Hold(TAP, lab.caps)
    hold.install_open()
    hold.close()
    tc.add_egress_redirect(TAP, lab.cap_dev.ifname, caps=lab.caps, slot=0)
    tc.add_egress_redirect(TAP, lab.cap_dev.ifname, caps=lab.caps, slot=15)
    with _plain_socket(TAP) as s:
        tc.del_egress_redirect(TAP, slot=0)
        tc.del_egress_redirect(TAP, slot=15)
        for i in range(5):
            s.send(frame(b"H", i))  # held
        tc.add_egress_redirect(TAP, lab.cap_dev.ifname, caps=lab.caps, slot=0)
    time.sleep(0.1)
    assert lab.reader.of("H") == []

    removed = tc.sweep(prefixes=["npd"])

    # The kernel may queue a frame of its own (IPv6 RS/MLD) on the tap while the hold is closed.
    hold_line = [r for r in removed if "hold 4e50:" in r]
    assert sorted(r for r in removed if r not in hold_line) == sorted(
        [
            f"{TAP}: deleted egress filter prio {tc.PRIO_BASE:#x}",
            f"{other}: deleted egress filter prio {tc.PRIO_BASE + 5:#x}",
        ]
    )
    m = re.fullmatch(
        rf"{TAP}: deleted {lab.caps.hold_kind} hold 4e50: \((\d+) frames held\)", hold_line[0]
    )
    assert len(hold_line) == 1 and m is not None and int(m.group(1)) >= 5
    assert wait_until(lambda: lab.reader.of("H") == list(range(5)), 2)  # not black-holed
    assert tc.egress_filter_prios(other) == foreign
    assert tc.egress_filter_prios(TAP) == {100}
    with iproute() as ipr:
        roots = {
            m["index"]: (m.get_attr("TCA_KIND"), m["handle"])
            for m in ipr.get_qdiscs()
            if m["parent"] == tcnl.TC_H_ROOT
        }
    assert roots[o_idx] == ("tbf", 0x10000)
    assert roots.get(t_idx, ("", 0))[1] != tc.HOLD_HANDLE
    assert tc.sweep(prefixes=["npd"]) == []


def test_sweep_can_keep_a_prepared_hold_open(netns: str) -> None:
    fd = tapfd.open_tap("npdtapk", hdr_len=HDR_LEN)
    try:
        with iproute() as ipr:
            ipr.link("set", ifname="npdtapk", state="up")
        tc.prepare_tap("npdtapk")
        assert tc.has_hold("npdtapk")
        tc.Hold("npdtapk").close()
        with _plain_socket("npdtapk") as s:
            s.send(frame(b"H", 0))
        time.sleep(0.05)
        assert not tapfd.queued(fd)
        assert tc.sweep(["npdtapk"], keep_hold_open=True) == [
            f"npdtapk: opened {detect_caps().hold_kind} hold 4e50: (1 frames held)"
        ]
        assert wait_until(lambda: tapfd.queued(fd), 1)
        assert [parse(f) for f in tapfd.drain(fd, HDR_LEN)] == [("H", 0)]
        assert tc.has_hold("npdtapk") and tc.has_clsact("npdtapk")
    finally:
        os.close(fd)


# --- the bench's announce sniffer


def test_announce_sniffer_keeps_only_the_vms_arp_and_rarp(netns: str) -> None:
    """The kernel filter passes the VM's announces only: other MACs, other ethertypes and
    the migration stream that crosses the same port never wake the sniffer."""

    with iproute() as ipr:
        ipr.link("add", ifname="npdsn0", kind="veth", peer="npdsn1")
        for name in ("npdsn0", "npdsn1"):
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
    vm, other = bytes.fromhex("52540000aa01"), bytes.fromhex("52540000aa02")

    def frame(src: bytes, ethertype: int, tag: int) -> bytes:
        return b"\xff" * 6 + src + struct.pack("!H", ethertype) + bytes([tag]) * 46

    sent = [
        frame(vm, ETH_P_RARP, 1),
        frame(other, ETH_P_RARP, 2),
        frame(vm, 0x0800, 3),  # IPv4 from the VM: not an announce
        frame(vm[:5] + b"\x00", ETH_P_ARP, 4),  # first four bytes match, last two do not
        frame(vm, ETH_P_ARP, 5),
    ]
    with AnnounceSniffer(netns, "npdsn1", "52:54:00:00:aa:01") as sn:
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        tx.bind(("npdsn0", 0))
        for f in sent:
            tx.send(f)
        tx.close()
        deadline = time.monotonic() + 2
        while len(sn.times) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # a wrongly kept frame would arrive by now
    assert len(sn.times) == 2
    assert sn.frames_read == 2  # the kernel dropped the other three
