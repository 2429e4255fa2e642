"""Low-level traffic-control requests over netlink (pyroute2), shared by `caps` and `tc`.

Callers translate `NetlinkError` into netpass errors; this module only builds and sends
(`PreparedChange`: a change encoded ahead, for when CPU is scarce).
pyroute2 covers clsact, u32/matchall filters with mirred, and sch_plug. Its TBF helper can
set neither `mpu` nor 64-bit rates, which the TBF hold needs, so TBF messages are built here.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Literal

from pyroute2 import IPRoute
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    nla,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELQDISC,
    RTM_DELTFILTER,
    RTM_GETQDISC,
    RTM_GETTFILTER,
    RTM_NEWQDISC,
)
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from netpass.datapath.netns import in_netns

TC_H_ROOT = 0xFFFFFFFF
CLSACT_HANDLE = 0xFFFF0000
EGRESS_PARENT = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
ETH_P_ALL = 0x0003

PSCHED_SHIFT = 6  # kernel: PSCHED_TICKS2NS(x) = x << 6
TC_LINKLAYER_ETHERNET = 1
MAX_MPU = 0xFFFF  # tc_ratespec.mpu is u16

PLUG_BUFFER = 0
PLUG_RELEASE_ONE = 1
PLUG_RELEASE_INDEFINITE = 2
PLUG_LIMIT = 3

NLMSG_ERROR = 2
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id

MatchAll = Literal["matchall", "u32"]

_REQ = NLM_F_REQUEST | NLM_F_ACK
_CREATE = _REQ | NLM_F_CREATE | NLM_F_EXCL
_CHANGE = _REQ | NLM_F_REPLACE


class _TbfOptions(nla):  # type: ignore[misc]
    """TCA_OPTIONS of a TBF qdisc, with the attributes pyroute2 lacks."""

    nla_map = (
        ("TCA_TBF_UNSPEC", "none"),
        ("TCA_TBF_PARMS", "parms"),
        ("TCA_TBF_RTAB", "hex"),
        ("TCA_TBF_PTAB", "hex"),
        ("TCA_TBF_RATE64", "uint64"),
        ("TCA_TBF_PRATE64", "uint64"),
        ("TCA_TBF_BURST", "uint32"),
        ("TCA_TBF_PBURST", "uint32"),
        ("TCA_TBF_PAD", "hex"),
    )

    class parms(nla):  # type: ignore[misc]  # struct tc_tbf_qopt
        fields = (
            ("rate_cell_log", "B"),
            ("rate_linklayer", "B"),
            ("rate_overhead", "H"),
            ("rate_cell_align", "h"),
            ("rate_mpu", "H"),
            ("rate", "I"),
            ("peak_cell_log", "B"),
            ("peak_linklayer", "B"),
            ("peak_overhead", "H"),
            ("peak_cell_align", "h"),
            ("peak_mpu", "H"),
            ("peak", "I"),
            ("limit", "I"),
            ("buffer", "I"),
            ("mtu", "I"),
        )


class _TbfMsg(tcmsg):  # type: ignore[misc]
    @staticmethod
    def get_options(self: Any, *argv: Any, **kwarg: Any) -> type[nla]:
        return _TbfOptions


# --- TBF arithmetic, mirroring the kernel (net/sched/sch_generic.c, include/net/sch_generic.h)


def ratecfg(rate: int) -> tuple[int, int]:
    """(mult, shift) as psched_ratecfg_precompute() derives them from RATE bytes/s."""
    factor, shift = 1_000_000_000, 0
    while True:
        mult = factor // rate
        if mult & (1 << 31) or factor & (1 << 63):
            return mult, shift
        factor <<= 1
        shift += 1


def l2t_ns(rate: int, mpu: int, length: int) -> int:
    """Token cost in ns of a LENGTH-byte frame (psched_l2t_ns, Ethernet link layer)."""
    mult, shift = ratecfg(rate)
    return (max(length, mpu) * mult) >> shift


def t2l(rate: int, ns: int) -> int:
    """Largest frame a bucket of NS admits (psched_ns_t2l, ignoring mpu like the kernel)."""
    mult, shift = ratecfg(rate)
    return (min(ns, 0xFFFFFFFF) << shift) // mult


@dataclass(frozen=True)
class TbfParams:
    rate: int  # bytes/s
    mpu: int  # every frame is charged at least this many bytes
    buffer_ticks: int  # bucket size in 64 ns ticks
    limit: int  # bytes the child bfifo may hold

    @property
    def buffer_ns(self) -> int:
        return self.buffer_ticks << PSCHED_SHIFT

    @property
    def max_size(self) -> int:
        """Frames longer than this are dropped at enqueue (GSO ones are segmented)."""
        return t2l(self.rate, self.buffer_ns)

    @property
    def frame_cost_ns(self) -> int:
        """Tokens any frame up to `mpu` bytes costs."""
        return l2t_ns(self.rate, self.mpu, 0)


def tbf_msg(index: int, handle: int, p: TbfParams) -> Any:
    msg = _TbfMsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["handle"] = handle
    msg["parent"] = TC_H_ROOT
    parms = {
        "rate_linklayer": TC_LINKLAYER_ETHERNET,  # no rate table needed
        "rate_mpu": p.mpu,
        "rate": min(p.rate, 0xFFFFFFFF),
        "limit": p.limit,
        "buffer": p.buffer_ticks,
        "mtu": 0,
    }
    attrs: list[list[Any]] = [["TCA_TBF_PARMS", parms]]
    if p.rate > 0xFFFFFFFF:
        attrs.append(["TCA_TBF_RATE64", p.rate])
    # No TCA_TBF_BURST on purpose: with it the kernel derives the bucket from a byte count
    # *including* mpu, which would make every frame fit the bucket (see tc.py, Hold).
    msg["attrs"] = [["TCA_KIND", "tbf"], ["TCA_OPTIONS", {"attrs": attrs}]]
    return msg


def tbf_set(ipr: IPRoute, index: int, handle: int, p: TbfParams, *, create: bool) -> None:
    _send(ipr, tbf_msg(index, handle, p), RTM_NEWQDISC, _CREATE if create else _CHANGE)


def plug_msg(index: int, handle: int, action: int, limit: int) -> Any:
    msg = tcmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["handle"] = handle
    msg["parent"] = TC_H_ROOT
    msg["attrs"] = [["TCA_KIND", "plug"], ["TCA_OPTIONS", {"action": action, "limit": limit}]]
    return msg


def plug_set(
    ipr: IPRoute, index: int, handle: int, action: int, limit: int, *, create: bool
) -> None:
    _send(ipr, plug_msg(index, handle, action, limit), RTM_NEWQDISC, _CREATE if create else _CHANGE)


def del_root_qdisc(ipr: IPRoute, index: int, handle: int) -> None:
    msg = tcmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["handle"] = handle
    msg["parent"] = TC_H_ROOT
    _send(ipr, msg, RTM_DELQDISC, _REQ)


def add_clsact(ipr: IPRoute, index: int) -> None:
    ipr.tc("add", "clsact", index)


def add_filter(
    ipr: IPRoute, index: int, prio: int, match: MatchAll, redirect_to: int | None
) -> None:
    """Match-all filter on clsact egress; with REDIRECT_TO, `mirred egress redirect` there."""
    kw: dict[str, Any] = {"parent": EGRESS_PARENT, "prio": prio, "protocol": ETH_P_ALL}
    if redirect_to is not None:
        kw["action"] = {
            "kind": "mirred",
            "direction": "egress",
            "action": "redirect",
            "ifindex": redirect_to,
        }
    if match == "u32":
        ipr.tc("add-filter", "u32", index, target=0, keys=["0x0/0x0+0"], **kw)
    else:
        ipr.tc("add-filter", "matchall", index, **kw)


def del_filter_prio(ipr: IPRoute, index: int, parent: int, prio: int) -> None:
    """Delete every filter of priority PRIO under PARENT (the whole classifier instance)."""
    msg = tcmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["handle"] = 0
    msg["parent"] = parent
    msg["info"] = prio << 16  # protocol 0: any
    _send(ipr, msg, RTM_DELTFILTER, _REQ)


def dump_filters(ipr: IPRoute, index: int, parent: int) -> list[Any]:
    msg = tcmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["parent"] = parent
    return list(ipr.nlm_request(msg, RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP))


def dump_qdiscs(ipr: IPRoute, index: int) -> list[Any]:
    """Qdiscs of interface INDEX (the kernel dumps all; filter here)."""
    msg = tcmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msgs = ipr.nlm_request(msg, RTM_GETQDISC, NLM_F_REQUEST | NLM_F_DUMP)
    return [m for m in msgs if m["index"] == index]


def _send(ipr: IPRoute, msg: Any, msg_type: int, flags: int) -> None:
    tuple(ipr.nlm_request(msg, msg_type, flags))


class PreparedChange:
    """One qdisc change, encoded in advance and sent on a netlink socket opened in advance.

    For the switchover: the hold closes while the destination QEMU loads the VM, and the
    pyroute2 path (socket, link lookup, encode, parse) costs ~1 ms of CPU there, this 10 µs.
    """

    def __init__(self, msg: Any, netns: str | None = None) -> None:
        msg.encode()  # the header is packed at each send
        self._data = bytearray(msg.data)
        with in_netns(netns):
            self._sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
            )
        self._sock.settimeout(2.0)
        self._sock.bind((0, 0))
        self._seq = 0

    def send(self) -> None:
        """Apply the change; NetlinkError if the kernel refuses it."""
        self._seq += 1
        _NLMSGHDR.pack_into(self._data, 0, len(self._data), RTM_NEWQDISC, _CHANGE, self._seq, 0)
        self._sock.send(self._data)
        while True:  # only our own answers come to this socket; skip a stale one
            reply = self._sock.recv(65536)
            _, kind, _, seq, _ = _NLMSGHDR.unpack_from(reply)
            if kind == NLMSG_ERROR and seq == self._seq:
                code = -struct.unpack_from("=i", reply, _NLMSGHDR.size)[0]
                if code:
                    raise NetlinkError(code, os.strerror(code))
                return

    def close(self) -> None:
        self._sock.close()


# --- TBF parameter sets used by the hold (the reasoning is in tc.py, class Hold)

HOLD_GAP_NS = 1_000_000  # closed: re-check period, so the release delay is at most this
_CLOSED_RATE = 16384  # bytes/s: bucket stays < 2**32 ns and admits frames up to ~64 KB
_OPEN_RATE = 1 << 37  # bytes/s (~1.1 Tbit/s): never the bottleneck of a tap


def tbf_closed(limit: int) -> TbfParams:
    """A TBF that admits frames up to ~64 KB yet can never dequeue one: every frame costs
    `mpu` bytes of tokens, one `HOLD_GAP_NS` more than the bucket can ever hold."""
    cost = l2t_ns(_CLOSED_RATE, MAX_MPU, 0)
    p = TbfParams(_CLOSED_RATE, MAX_MPU, (cost - HOLD_GAP_NS) >> PSCHED_SHIFT, limit)
    assert p.buffer_ns < p.frame_cost_ns and p.max_size >= 65000, p
    return p


def tbf_open(limit: int) -> TbfParams:
    """A TBF that never delays a frame: 1 ms of bucket at ~1.1 Tbit/s."""
    return TbfParams(_OPEN_RATE, 0, 1_000_000 >> PSCHED_SHIFT, limit)


def tbf_paced(limit: int, per_ms: float) -> TbfParams:
    """PER_MS frames per millisecond whatever their size (up to 64 KB): every frame is charged
    `mpu` bytes; the bucket holds one millisecond's worth (at least one frame)."""
    rate = max(1, round(per_ms * 1000 * MAX_MPU))
    burst = max(1.0, per_ms)
    cost = l2t_ns(rate, MAX_MPU, 0)
    # A hair more than BURST frames, so rounding never leaves it a frame short.
    return TbfParams(rate, MAX_MPU, (int(cost * burst) + 64) >> PSCHED_SHIFT, limit)
