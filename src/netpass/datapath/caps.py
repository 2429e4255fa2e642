"""Which kernel data-path features this host has, found by trying them.

Module lists lie both ways (built-in features have no module; a listed module may fail to
load), so every feature is tried for real in a throw-away network namespace: an anonymous one
created by `unshare` in a short-lived thread, gone when the thread ends — nothing to clean up
after a crash. The result is cached per process.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pyroute2.netlink.exceptions import NetlinkError

from netpass.datapath import tcnl
from netpass.datapath.netns import CLONE_NEWNET, ifindex, iproute
from netpass.errors import HostError

CaptureKind = Literal["dummy", "veth"]
HoldKind = Literal["plug", "tbf"]

PROBE_HANDLE = 0x4E500000


@dataclass(frozen=True)
class KernelCaps:
    veth: bool
    dummy: bool
    clsact: bool
    u32: bool
    matchall: bool
    mirred: bool
    tbf: bool  # with netpass's closed-hold parameters (mpu, bucket)
    plug: bool

    @property
    def capture_kind(self) -> CaptureKind:
        """Device egress frames are redirected to: a dummy if possible, else a veth pair."""
        if self.dummy:
            return "dummy"
        if self.veth:
            return "veth"
        raise HostError("kernel has neither dummy nor veth links: no capture device possible")

    @property
    def match_all(self) -> tcnl.MatchAll:
        """Classifier that matches every frame: matchall, else `u32 match u32 0 0`."""
        if self.matchall:
            return "matchall"
        if self.u32:
            return "u32"
        raise HostError("kernel has neither cls_matchall nor cls_u32: cannot redirect a tap")

    @property
    def hold_kind(self) -> HoldKind:
        """Root qdisc that holds frames: sch_plug, else a TBF used as a plug."""
        if self.plug:
            return "plug"
        if self.tbf:
            return "tbf"
        raise HostError("kernel has neither sch_plug nor sch_tbf: cannot hold frames on a tap")

    def require(self) -> None:
        """Raise HostError unless the whole netpass data path can be built."""
        if not self.clsact:
            raise HostError("kernel lacks the clsact qdisc (sch_ingress): cannot redirect a tap")
        if not self.mirred:
            raise HostError("kernel lacks the mirred action (act_mirred): cannot redirect a tap")
        _ = self.capture_kind, self.match_all, self.hold_kind


_cache: tuple[int, KernelCaps] | None = None
_lock = threading.Lock()


def detect_caps(*, refresh: bool = False) -> KernelCaps:
    """Probe once per process (a forked child probes again); REFRESH forces a new probe."""
    global _cache
    with _lock:
        if refresh or _cache is None or _cache[0] != os.getpid():
            _cache = (os.getpid(), _probe_in_scratch_netns())
        return _cache[1]


def _probe_in_scratch_netns() -> KernelCaps:
    out: list[KernelCaps | BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise HostError(f"cannot create a scratch network namespace: {os.strerror(err)}")
            out.append(_probe_here())
        except BaseException as e:  # handed to the caller's thread
            out.append(e)

    t = threading.Thread(target=run, name="netpass-caps-probe", daemon=True)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _works(action: Callable[[], object]) -> bool:
    try:
        action()
    except (NetlinkError, OSError):
        return False
    return True


def _probe_here() -> KernelCaps:
    """Try each feature in the current (scratch) namespace."""
    with iproute() as ipr:
        veth = _works(lambda: ipr.link("add", ifname="npdk0", kind="veth", peer="npdk1"))
        dummy = _works(lambda: ipr.link("add", ifname="npdkd", kind="dummy"))
        host = "npdk0" if veth else "npdkd" if dummy else "lo"
        peer = "npdk1" if veth else host
        idx, peer_idx, lo = ifindex(ipr, host), ifindex(ipr, peer), ifindex(ipr, "lo")

        clsact = _works(lambda: tcnl.add_clsact(ipr, idx))
        u32 = clsact and _works(lambda: tcnl.add_filter(ipr, idx, 1, "u32", None))
        matchall = clsact and _works(lambda: tcnl.add_filter(ipr, idx, 2, "matchall", None))
        mirred = (u32 or matchall) and _works(
            lambda: tcnl.add_filter(ipr, idx, 3, "u32" if u32 else "matchall", peer_idx)
        )
        tbf = _works(
            lambda: tcnl.tbf_set(ipr, idx, PROBE_HANDLE, tcnl.tbf_closed(1 << 20), create=True)
        )
        plug = _works(
            lambda: tcnl.plug_set(
                ipr, lo, PROBE_HANDLE, tcnl.PLUG_RELEASE_INDEFINITE, 1 << 20, create=True
            )
        )
    return KernelCaps(
        veth=veth,
        dummy=dummy,
        clsact=clsact,
        u32=u32,
        matchall=matchall,
        mirred=mirred,
        tbf=tbf,
        plug=plug,
    )
