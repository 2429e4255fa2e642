"""netpass's traffic-control objects on a tap: egress redirect filters and the hold qdisc.

Every object netpass creates is marked so `sweep` can find it after a crash and never touches
anyone else's:

* redirect filters sit on clsact egress at priorities `PRIO_BASE`..`PRIO_BASE + PRIO_SLOTS - 1`
  (0x4E50 = "NP");
* the hold is the root qdisc with handle `HOLD_HANDLE` (`4e50:`).

Adding or deleting a *filter* on a busy tap loses no frame; adding or deleting a *qdisc*
(clsact, the hold) can drop a few, so do that before traffic matters.
All functions act in the calling thread's network namespace unless `netns=` is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netpass.datapath import tcnl
from netpass.datapath.caps import HoldKind, KernelCaps, detect_caps
from netpass.datapath.netns import ifindex, iproute
from netpass.errors import DatapathError

PRIO_BASE = 0x4E50
PRIO_SLOTS = 16
HOLD_HANDLE = 0x4E500000
PREPARED_TXQUEUELEN = 10000  # frames: 1 s at 10k pps
DEFAULT_HOLD_LIMIT = 32 << 20  # bytes: > 20,000 full-size frames
DRAIN_POLL_MIN_S = 0.001  # `wait_drained` looks at the queue at most this often...
DRAIN_POLL_MAX_S = 0.010  # ...and at least this often


def redirect_prio(slot: int) -> int:
    if not 0 <= slot < PRIO_SLOTS:
        raise DatapathError(f"redirect slot {slot} out of range 0..{PRIO_SLOTS - 1}")
    return PRIO_BASE + slot


def _is_ours(prio: int) -> bool:
    return PRIO_BASE <= prio < PRIO_BASE + PRIO_SLOTS


def _nl_error(what: str, e: NetlinkError) -> DatapathError:
    return DatapathError(f"{what}: {e.args[1] if len(e.args) > 1 else e}")


# --- clsact and redirect filters


def has_clsact(ifname: str, *, netns: str | None = None) -> bool:
    with iproute(netns) as ipr:
        return _clsact_present(ipr, ifindex(ipr, ifname))


def _clsact_present(ipr: IPRoute, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in tcnl.dump_qdiscs(ipr, index))


def ensure_clsact(ifname: str, *, netns: str | None = None) -> bool:
    """Add the clsact qdisc to IFNAME unless present; True if it was added.

    May drop a few frames on a busy interface: call it before traffic matters.
    """
    with iproute(netns) as ipr:
        index = ifindex(ipr, ifname)
        if _clsact_present(ipr, index):
            return False
        try:
            tcnl.add_clsact(ipr, index)
        except NetlinkError as e:
            raise _nl_error(f"cannot add clsact qdisc to {ifname}", e) from e
        return True


def add_egress_redirect(
    ifname: str,
    to_ifname: str,
    *,
    slot: int = 0,
    caps: KernelCaps | None = None,
    netns: str | None = None,
) -> None:
    """Redirect every frame leaving IFNAME to TO_IFNAME's egress (match-all + mirred).

    From the moment this returns, IFNAME's reader gets no new frame; each frame goes exactly
    once to one side. Needs `ensure_clsact(ifname)` first.
    """
    prio = redirect_prio(slot)
    match = (caps or detect_caps()).match_all
    with iproute(netns) as ipr:
        index, target = ifindex(ipr, ifname), ifindex(ipr, to_ifname)
        if not _clsact_present(ipr, index):
            raise DatapathError(f"{ifname} has no clsact qdisc; call ensure_clsact first")
        if prio in _filter_prios(ipr, index):
            # A second u32 node at the same prio would be added silently; refuse instead.
            raise DatapathError(f"{ifname} already has a netpass filter at prio {prio:#x}")
        try:
            tcnl.add_filter(ipr, index, prio, match, target)
        except NetlinkError as e:
            raise _nl_error(f"cannot redirect {ifname} egress to {to_ifname}", e) from e


def del_egress_redirect(ifname: str, *, slot: int = 0, netns: str | None = None) -> bool:
    """Remove the redirect filter in SLOT; False if there was none."""
    prio = redirect_prio(slot)
    with iproute(netns) as ipr:
        index = ifindex(ipr, ifname)
        if prio not in _filter_prios(ipr, index):
            return False
        try:
            tcnl.del_filter_prio(ipr, index, tcnl.EGRESS_PARENT, prio)
        except NetlinkError as e:
            raise _nl_error(f"cannot delete redirect filter on {ifname}", e) from e
        return True


def egress_filter_prios(ifname: str, *, netns: str | None = None) -> set[int]:
    """Priorities of all clsact egress filters on IFNAME (netpass's and others')."""
    with iproute(netns) as ipr:
        return _filter_prios(ipr, ifindex(ipr, ifname))


def _filter_prios(ipr: IPRoute, index: int) -> set[int]:
    if not _clsact_present(ipr, index):
        return set()
    try:
        msgs = tcnl.dump_filters(ipr, index, tcnl.EGRESS_PARENT)
    except NetlinkError as e:
        raise _nl_error("cannot list egress filters", e) from e
    return {m["info"] >> 16 for m in msgs}


# --- the hold


@dataclass(frozen=True)
class QdiscStats:
    kind: str
    qlen: int  # frames queued (held)
    backlog: int  # bytes queued
    drops: int
    sent_packets: int


class Hold:
    """A root qdisc on a tap that can hold every frame bound for the guest, then release them
    in arrival order. Frames injected with PACKET_QDISC_BYPASS skip it (and clsact egress), so
    older frames can be delivered first while newer ones wait.

    sch_plug (where available): `block` holds, `release_indefinite` releases.

    TBF used as a plug (this host): a TBF dequeues a frame when its bucket holds the frame's
    token cost. A TBF merely set to a tiny rate leaks, because a change refills the bucket and
    the bucket must admit a max-size frame. Instead the closed TBF charges *every* frame `mpu`
    = 65535 bytes (frames up to 64 KB cost the same), and its bucket is set in time units (no
    TCA_TBF_BURST) to 1 ms less than that cost. Tokens are capped at the bucket size, so no
    frame can ever be dequeued, however long the hold lasts — while the kernel's max_size,
    computed from the bucket *without* mpu, still admits frames up to 65,518 bytes. The TBF
    re-checks every `tcnl.HOLD_GAP_NS` (1 ms), which bounds the release delay after `open()`.
    Residual risks: a non-GSO frame over 65,518 bytes is dropped while closed (tap MTU ≤ 64 KB
    minus headers makes this theoretical); kernels older than 3.x replaced the TBF's queue on
    every change (fixed long ago, and this path is only used where sch_plug is missing).

    Releasing: the tap driver drops whatever does not fit its queue (txqueuelen), and the
    hypervisor reads at the guest's pace. Measured with a Python reader: 5,000 frames released
    at once into a 1,000-frame tap queue lost 3,001. So pace the release, or make the tap queue
    larger than the hold (`set_txqueuelen`); `tx_dropped` tells if frames were lost there.
    `open(pace_per_ms=...)` (TBF only) releases at most that many frames per millisecond; new
    frames queue behind the held ones, so the order is kept. Call `open()` again to unpace.
    """

    def __init__(
        self,
        ifname: str,
        caps: KernelCaps | None = None,
        *,
        kind: HoldKind | None = None,
        limit_bytes: int = DEFAULT_HOLD_LIMIT,
        netns: str | None = None,
    ) -> None:
        self.ifname = ifname
        self.kind: HoldKind = kind or (caps or detect_caps()).hold_kind
        self.limit_bytes = limit_bytes
        self.netns = netns
        self.closed = False
        self.pace_per_ms: float | None = None  # frames/ms while a paced `open` is in force
        self._close_change: tcnl.PreparedChange | None = None

    @property
    def paced(self) -> bool:
        return self.pace_per_ms is not None

    @property
    def can_pace(self) -> bool:
        return self.kind == "tbf"

    def install_open(self) -> None:
        """Make the hold IFNAME's root qdisc, open. May drop a few frames on a busy tap.

        Adopts a netpass hold of the same kind left by a crashed run; refuses to replace a
        root qdisc that is not netpass's.
        """
        with iproute(self.netns) as ipr:
            index = ifindex(ipr, self.ifname)
            root = _root_qdisc(ipr, index)
            try:
                if root is not None and root.handle == HOLD_HANDLE and root.kind == self.kind:
                    self._set_open(ipr, index, create=False)
                elif root is not None and root.handle != 0:
                    raise DatapathError(
                        f"{self.ifname} already has a root qdisc {root.kind} "
                        f"{root.handle >> 16:x}:, not netpass's; remove it first"
                    )
                else:
                    self._set_open(ipr, index, create=True)
            except NetlinkError as e:
                raise _nl_error(f"cannot install {self.kind} hold on {self.ifname}", e) from e
        self.closed, self.pace_per_ms = False, None

    def prepare_close(self) -> None:
        """Encode the closing change now: `close` then costs ~10 µs of CPU instead of ~1 ms,
        which matters when it runs during the switchover, next to the loading QEMU."""
        with iproute(self.netns) as ipr:
            index = ifindex(ipr, self.ifname)
        if self.kind == "plug":
            msg = tcnl.plug_msg(index, HOLD_HANDLE, tcnl.PLUG_BUFFER, 0)
        else:
            msg = tcnl.tbf_msg(index, HOLD_HANDLE, tcnl.tbf_closed(self.limit_bytes))
        self.drop_prepared()
        self._close_change = tcnl.PreparedChange(msg, self.netns)

    def drop_prepared(self) -> None:
        if self._close_change is not None:
            self._close_change.close()
            self._close_change = None

    def close(self) -> None:
        """Hold every frame that reaches the root qdisc from now on."""
        if self.close_prepared():
            return
        with iproute(self.netns) as ipr:
            index = ifindex(ipr, self.ifname)
            try:
                if self.kind == "plug":
                    tcnl.plug_set(ipr, index, HOLD_HANDLE, tcnl.PLUG_BUFFER, 0, create=False)
                else:
                    tcnl.tbf_set(
                        ipr, index, HOLD_HANDLE, tcnl.tbf_closed(self.limit_bytes), create=False
                    )
            except NetlinkError as e:
                raise _nl_error(f"cannot close hold on {self.ifname}", e) from e
        self.closed, self.pace_per_ms = True, None

    def close_prepared(self) -> bool:
        """`close` with the change encoded in advance, without pyroute2 (so an event loop's
        thread may call it); False when there is none or the kernel refused it (the tap was
        re-created, say): then `close` takes the full path, which finds it or says why not.
        A refused change is dropped, so that path does not try it again."""
        if self._close_change is None:
            return False
        try:
            self._close_change.send()
        except (NetlinkError, OSError):
            self.drop_prepared()
            return False
        self.closed, self.pace_per_ms = True, None
        return True

    def open(self, pace_per_ms: float | None = None) -> None:
        """Release held frames in arrival order, then pass frames through.

        PACE_PER_MS limits the release to that many frames per millisecond (TBF only; sch_plug
        releases at once). Pacing stays in force until `open()` is called without it.
        """
        if pace_per_ms is not None and not (pace_per_ms > 0 and math.isfinite(pace_per_ms)):
            raise DatapathError(f"pace must be a positive number of frames/ms, not {pace_per_ms}")
        with iproute(self.netns) as ipr:
            index = ifindex(ipr, self.ifname)
            try:
                if pace_per_ms is not None and self.kind == "tbf":
                    p = tcnl.tbf_paced(self.limit_bytes, pace_per_ms)
                    tcnl.tbf_set(ipr, index, HOLD_HANDLE, p, create=False)
                    self.pace_per_ms = pace_per_ms
                else:
                    self._set_open(ipr, index, create=False)
                    self.pace_per_ms = None
            except NetlinkError as e:
                raise _nl_error(f"cannot open hold on {self.ifname}", e) from e
        self.closed = False

    def stats(self) -> QdiscStats:
        with iproute(self.netns) as ipr:
            return self._stats(ipr, ifindex(ipr, self.ifname))

    def _stats(self, ipr: IPRoute, index: int) -> QdiscStats:
        root = _root_qdisc(ipr, index)
        if root is None or root.handle != HOLD_HANDLE:
            raise DatapathError(f"no netpass hold on {self.ifname}")
        return root.stats

    def wait_drained(self, timeout: float) -> bool:
        """Wait until nothing is queued in the hold (e.g. after a paced open); False on timeout.

        One netlink socket for the whole wait, and a look about when the queue can have
        drained at the pace: a fresh socket every millisecond kept a core busy for as long as
        a paced release lasted, right after the destination VM started (perf, 2026-11-26).
        """
        deadline = time.monotonic() + timeout
        with iproute(self.netns) as ipr:
            index = ifindex(ipr, self.ifname)
            while qlen := self._stats(ipr, index).qlen:
                now = time.monotonic()
                if now >= deadline:
                    return False
                pace = self.pace_per_ms
                eta = qlen / pace / 1e3 if pace else DRAIN_POLL_MIN_S
                time.sleep(min(max(eta, DRAIN_POLL_MIN_S), DRAIN_POLL_MAX_S, deadline - now))
        return True

    def remove(self, drain_timeout: float = 2.0) -> None:
        """Open, let held frames out, and delete the hold (the kernel restores the default
        root qdisc). No-op if the hold is not there."""
        with iproute(self.netns) as ipr:
            index = ifindex(ipr, self.ifname)
            root = _root_qdisc(ipr, index)
            if root is None or root.handle != HOLD_HANDLE:
                return
            try:
                _release_and_delete(ipr, index, root, drain_timeout)
            except NetlinkError as e:
                raise _nl_error(f"cannot remove hold from {self.ifname}", e) from e
        self.closed, self.pace_per_ms = False, None

    def _set_open(self, ipr: IPRoute, index: int, *, create: bool) -> None:
        if self.kind == "plug":
            if create:  # sch_plug starts closed and takes its limit at creation
                tcnl.plug_set(
                    ipr, index, HOLD_HANDLE, tcnl.PLUG_LIMIT, self.limit_bytes, create=True
                )
            tcnl.plug_set(ipr, index, HOLD_HANDLE, tcnl.PLUG_RELEASE_INDEFINITE, 0, create=False)
        else:
            tcnl.tbf_set(ipr, index, HOLD_HANDLE, tcnl.tbf_open(self.limit_bytes), create=create)


@dataclass(frozen=True)
class _Root:
    kind: str
    handle: int
    stats: QdiscStats


def _root_qdisc(ipr: IPRoute, index: int) -> _Root | None:
    try:
        msgs = tcnl.dump_qdiscs(ipr, index)
    except NetlinkError as e:
        raise _nl_error("cannot list qdiscs", e) from e
    for m in msgs:
        if m["parent"] == tcnl.TC_H_ROOT:
            kind = str(m.get_attr("TCA_KIND"))
            st = m.get_attr("TCA_STATS") or {}
            stats = QdiscStats(
                kind=kind,
                qlen=int(st.get("qlen", 0)),
                backlog=int(st.get("backlog", 0)),
                drops=int(st.get("drop", 0)),
                sent_packets=int(st.get("packets", 0)),
            )
            return _Root(kind, int(m["handle"]), stats)
    return None


def _open_any(ipr: IPRoute, index: int, kind: str) -> None:
    """Open a netpass hold found on the interface, whoever installed it."""
    if kind == "plug":
        tcnl.plug_set(ipr, index, HOLD_HANDLE, tcnl.PLUG_RELEASE_INDEFINITE, 0, create=False)
    elif kind == "tbf":
        tcnl.tbf_set(ipr, index, HOLD_HANDLE, tcnl.tbf_open(DEFAULT_HOLD_LIMIT), create=False)


def _release_and_delete(ipr: IPRoute, index: int, root: _Root, drain_timeout: float) -> None:
    # Deleting a qdisc drops what it holds: open it and wait for it to empty first.
    _open_any(ipr, index, root.kind)
    deadline = time.monotonic() + drain_timeout
    while time.monotonic() < deadline:
        now = _root_qdisc(ipr, index)
        if now is None or now.stats.qlen == 0:
            break
        time.sleep(0.001)
    tcnl.del_root_qdisc(ipr, index, HOLD_HANDLE)


def has_hold(ifname: str, *, netns: str | None = None) -> bool:
    """True if IFNAME's root qdisc is a netpass hold (e.g. prepared by `prepare_tap`)."""
    with iproute(netns) as ipr:
        root = _root_qdisc(ipr, ifindex(ipr, ifname))
    return root is not None and root.handle == HOLD_HANDLE


def prepare_tap(ifname: str, *, netns: str | None = None) -> None:
    """Give a tap, before it carries traffic, the qdiscs netpass needs (clsact, open hold).

    Creating or deleting a qdisc on a busy tap drops a few frames; filters and hold changes do
    not. A host that runs this when it creates a VM's tap makes every later netpass switchover
    lossless from set-up to tear-down. Both objects are inert until netpass uses them.
    """
    # A deeper tap queue absorbs the catch-up after the switchover (rescued + held frames
    # while the guest resumes); resizing deactivates the device, so it happens before the
    # tap is busy and before the hold exists.
    if txqueuelen(ifname, netns=netns) < PREPARED_TXQUEUELEN:
        set_txqueuelen(ifname, PREPARED_TXQUEUELEN, netns=netns)
    ensure_clsact(ifname, netns=netns)
    Hold(ifname, netns=netns).install_open()


# --- the tap's own queue


def txqueuelen(ifname: str, *, netns: str | None = None) -> int:
    with iproute(netns) as ipr:
        return int(_link(ipr, ifname).get_attr("IFLA_TXQLEN"))


def set_txqueuelen(ifname: str, length: int, *, netns: str | None = None) -> None:
    """Resize IFNAME's queue; do it before installing the hold.

    The tap queue is what absorbs a released hold: the driver drops what does not fit, and
    the hypervisor reads at the guest's pace. Make it larger than the frames held, or pace.
    A tap resizes its ring keeping queued frames, but the kernel deactivates the device for
    the change, which silently empties its qdiscs: refused while the hold keeps frames.
    """
    with iproute(netns) as ipr:
        index = ifindex(ipr, ifname)
        root = _root_qdisc(ipr, index)
        if root is not None and root.handle == HOLD_HANDLE and root.stats.qlen:
            raise DatapathError(
                f"{ifname}: changing txqueuelen now would drop the {root.stats.qlen} held frames"
            )
        try:
            ipr.link("set", index=index, txqlen=length)
        except NetlinkError as e:
            raise _nl_error(f"cannot set txqueuelen of {ifname}", e) from e


def tx_dropped(ifname: str, *, netns: str | None = None) -> int:
    """Frames IFNAME's driver dropped on transmit (for a tap: its queue was full)."""
    with iproute(netns) as ipr:
        stats = _link(ipr, ifname).get_attr("IFLA_STATS64") or {}
        return int(stats.get("tx_dropped", 0))


def _link(ipr: IPRoute, ifname: str) -> Any:
    links = ipr.get_links(ifindex(ipr, ifname))
    if not links:
        raise DatapathError(f"no interface {ifname!r} in this network namespace")
    return links[0]


# --- crash recovery


def sweep(
    ifnames: Iterable[str] = (),
    *,
    prefixes: Iterable[str] = (),
    keep_hold_open: bool = False,
    netns: str | None = None,
) -> list[str]:
    """Undo netpass on the named interfaces and on every interface whose name starts with one
    of PREFIXES: delete redirect filters in netpass's prio range, and release a hold qdisc
    with netpass's handle, so no tap stays black-holed. The hold is then deleted (deleting a
    qdisc on a busy tap may drop a few frames), or with KEEP_HOLD_OPEN left in place, open
    (for taps given their qdiscs up front by `prepare_tap`). Leaves clsact qdiscs and
    everything that is not netpass's alone. Returns what was done, for a log."""
    names, pre = set(ifnames), tuple(prefixes)
    done: list[str] = []
    with iproute(netns) as ipr:
        for link in ipr.get_links():
            name = str(link.get_attr("IFLA_IFNAME"))
            if name not in names and not (pre and name.startswith(pre)):
                continue
            index = int(link["index"])
            try:
                for prio in sorted(p for p in _filter_prios(ipr, index) if _is_ours(p)):
                    tcnl.del_filter_prio(ipr, index, tcnl.EGRESS_PARENT, prio)
                    done.append(f"{name}: deleted egress filter prio {prio:#x}")
                root = _root_qdisc(ipr, index)
                if root is not None and root.handle == HOLD_HANDLE:
                    hold = f"{root.kind} hold {HOLD_HANDLE >> 16:x}:"
                    if keep_hold_open:
                        _open_any(ipr, index, root.kind)
                        done.append(f"{name}: opened {hold} ({root.stats.qlen} frames held)")
                    else:
                        _release_and_delete(ipr, index, root, 2.0)
                        done.append(f"{name}: deleted {hold} ({root.stats.qlen} frames held)")
            except NetlinkError as e:
                raise _nl_error(f"sweep of {name} failed", e) from e
    return done
