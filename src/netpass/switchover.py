"""The two per-host halves of a netpass switchover, for one NIC each.

SourceNic (on the source host): the tap's egress is redirected to a capture device and netpass
relays every frame back into the tap with PACKET_QDISC_BYPASS, recording the order. The guest's
RX used-idx then says exactly how many relayed frames the guest took before QEMU stopped it:
frames 1..K reached it, K+1.. did not (they sit in the tap queue, in QEMU's internal queue, or
were purged by the stop). Those, and everything captured after the stop, are owed to the
destination, in capture order. See docs/design.md.

DestNic (on the destination host): a root-qdisc hold on the tap keeps new frames back while the
rescued ones are injected with bypass (which skips the hold), then the hold opens.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from netpass.datapath import tapfd, tc
from netpass.datapath.capture import CaptureDevice, CaptureSocket, Frame
from netpass.datapath.inject import Injector
from netpass.discovery import NicInfo
from netpass.errors import DatapathError
from netpass.sysutil import name_this_thread

BROADCAST_OR_MULTICAST = 1  # low bit of the first destination MAC byte
# Catch-up at the destination. Rescued frames go into the tap as fast as it takes them: they
# are owed, and the tap queue (PREPARED_TXQUEUELEN) holds far more than a pause brings. Frames
# the hold kept are released at max(CATCHUP_MIN_PER_MS, CATCHUP_FACTOR x the rate frames
# arrived at), so the queue behind the rescued ones drains without one more burst.
# History: the rescued frames were paced too (a burst of 64, then this pace) while the lab
# guest dropped replies to large bursts (Ip OutDiscards: its ICMP socket ran out of send
# buffer while virtio_net napi_tx kept sent skbs charged). With napi_tx=0 (guest.py), unpaced:
# 0 lost in 20 runs at 5000 and 10000 pps, rescued frames in the tap 4.3 / 5.6 ms after RESUME
# instead of 37 / 43 ms (one host, n=10 each).
CATCHUP_MIN_PER_MS = 6.0
CATCHUP_FACTOR = 1.2
# The source tap has been quiet this long: the switch now points at the destination. 5 ms
# once let 2 frames through: on a loaded 2-core host they reached the capture socket more than
# 5 ms after the frame before them, so the hold had opened (one run in about 110).
QUIET_S = 0.010
EARLY_POLL_S = 0.002  # owed frames move to the loading destination's tap this often
RESCUE_DEADLINE_S = 0.5  # stop waiting for late source frames after this long past RESUME
RELEASE_MAX_S = 10.0  # a paced release that has not drained by then opens fully
# The relay wakes at most once per BATCH_S and moves everything queued: per-frame wake-ups (of
# netpass and, through the tap, of QEMU) cost 30% of a core at 10k pps, batches of 2 ms 8%.
# Relayed frames reach the running guest up to this much later; the accounting is unchanged.
BATCH_S = 0.002


@dataclass(frozen=True)
class Catchup:
    per_ms: float  # frames the hold kept are released at this pace (frames/ms)


def catchup_for(arrival_per_ms: float | None, sharing: int = 1) -> Catchup:
    """The destination's release pace for frames that arrived at ARRIVAL_PER_MS (None:
    unknown, as at rest), when SHARING migrations are being received by this host at once:
    the minimum pace is the host's, split between them (never below the arrival rate)."""
    rate = arrival_per_ms or 0.0
    return Catchup(max(CATCHUP_MIN_PER_MS / max(1, sharing), CATCHUP_FACTOR * rate))


@dataclass
class NicCounters:
    """Where every captured frame went. captured = consumed + injected + returned + dropped."""

    nic: str
    captured: int = 0  # frames the redirect took from the source tap
    relayed: int = 0  # fed through the tap to the running source guest
    consumed: int = 0  # relayed frames the source guest received before it stopped
    drained: int = 0  # relayed frames found still queued in the source tap after the stop
    rescued: int = 0  # frames owed to the destination guest
    injected: int = 0  # rescued frames delivered into the destination tap
    returned: int = 0  # frames given back to the source guest (migration failed)
    held: int = 0  # frames the destination hold kept back and released after the rescued ones
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> frames

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def balanced(self) -> bool:
        return self.captured == (
            self.consumed + self.injected + self.returned + sum(self.dropped.values())
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "nic": self.nic, "captured": self.captured, "relayed": self.relayed,
            "consumed": self.consumed, "drained": self.drained, "rescued": self.rescued,
            "injected": self.injected, "returned": self.returned, "held": self.held,
            "dropped": dict(self.dropped),
        }  # fmt: skip


class SourceNic:
    """Capture + relay + exact accounting on the source tap of one NIC."""

    def __init__(self, nic: NicInfo, qemu_pid: int, netns: str, slot: int) -> None:
        self.nic = nic
        self.pid = qemu_pid
        self.netns = netns
        self.slot = slot
        self.counters = NicCounters(nic.nic_id)
        self.cap = CaptureDevice(f"np{qemu_pid % 100000}s{slot}", netns=netns)
        self._lock = threading.Lock()
        self._pending: collections.deque[bytes] = collections.deque()  # captured, not relayed
        self._relayed: list[bytes] = []  # relay order since U0
        self._relayed_tail: list[bytes] = []  # relayed frames the source guest did not get
        self._drained: list[bytes] = []  # of those, read back out of the stopped tap queue
        self._drained_at_stop = False  # the tap queue was emptied at the stop
        self._relaying = False
        self._dest_runs = False  # until then the capture reads in batches
        # Owed frames handed out before the destination ran: they may sit in the tap of a
        # destination that never runs, so a failed migration gives them back from here.
        self._unconfirmed: list[bytes] = []
        self._rescue: collections.deque[bytes] | None = None  # set once accounted
        self._flush_ns: int | None = None  # after this, floods also reached the destination
        self._mac = bytes.fromhex(nic.mac.replace(":", ""))
        self._stop = threading.Event()
        # Cleared from the stop until the accounting or the destination's start: meanwhile
        # new frames have nowhere to go, so the thread leaves them in the socket (64 MiB)
        # instead of waking every 2 ms on the cores both QEMUs need for the pause.
        self._awake = threading.Event()
        self._awake.set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last_capture = time.monotonic()
        self._capture_on_t: float | None = None
        self._used_last = 0
        self._used_total = 0  # unwrapped frames consumed since relay start
        self._sock: CaptureSocket | None = None
        self._inj: Injector | None = None
        self._fd: int | None = None
        self._hdr = 0
        self._redirected = False

    # --- set-up and capture -------------------------------------------------------------
    def prepare(self) -> None:
        self.cap.create(replace=True)
        tc.ensure_clsact(self.nic.tap, netns=self.netns)
        self._sock = CaptureSocket(self.cap.ifname, netns=self.netns)
        self._inj = Injector(self.nic.tap, netns=self.netns)
        self._fd = tapfd.copy_fd(self.pid, self.nic.tap_fds[0])
        self._hdr = tapfd.vnet_hdr_size(self._fd)

    def capture_on(self) -> None:
        """Redirect the tap's egress; from now on every frame for the guest passes netpass."""
        tc.add_egress_redirect(self.nic.tap, self.cap.ifname, slot=self.slot, netns=self.netns)
        self._redirected = True
        self._capture_on_t = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"netpass-{self.nic.tap}")
        self._thread.start()

    def wait_tap_empty(self, timeout: float = 2.0) -> bool:
        """Wait until QEMU has read everything queued before the redirect."""
        assert self._fd is not None
        deadline = time.monotonic() + timeout
        while tapfd.queued(self._fd):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def start_relay(self, used_idx: int) -> None:
        """Start relaying; USED_IDX is the RX used-idx read while nothing was in flight."""
        with self._lock:
            self._used_last = used_idx
            self._relaying = True

    def observe_used(self, used_idx: int) -> None:
        """Feed a fresh used-idx reading (at least every 65535 frames) to unwrap the counter."""
        with self._lock:
            self._used_total += (used_idx - self._used_last) & 0xFFFF
            self._used_last = used_idx

    def stop_relay(self) -> None:
        with self._lock:
            self._relaying = False
            if self._rescue is None and not self._dest_runs:
                self._awake.clear()

    def account(self, used_idx_at_stop: int) -> int:
        """The VM is stopped: split relayed frames into received (1..K) and owed (K+1..)."""
        self.observe_used(used_idx_at_stop)
        with self._lock:
            self._relaying = False
            k = self._used_total
            if k > len(self._relayed):
                raise DatapathError(
                    f"{self.nic.nic_id}: guest consumed {k} frames but only "
                    f"{len(self._relayed)} were relayed (a frame took several RX buffers?)"
                )
            self.counters.consumed = k
            owed = self._relayed[k:]
            if not _in_order_within(self._drained, owed):  # drained at the stop, before this
                raise DatapathError(f"{self.nic.nic_id}: drained frames netpass did not owe")
            self._rescue = collections.deque([*owed, *self._pending])
            self._pending.clear()
            self.counters.rescued = len(self._rescue)
            self._relayed_tail = owed
        self._awake.set()  # what the socket kept follows, into the owed list
        return k

    def drain_tap(self) -> int:
        """Read what is still queued in the stopped source tap (owed frames, in order).

        A stopped QEMU reads at most one more frame, then stops polling the tap. The drained
        frames cross-check the accounting and let a failed migration give back exactly.
        Called at the stop too (`drain_at_stop`); the frames of both reads are kept.
        """
        assert self._fd is not None
        frames = tapfd.drain(self._fd, self._hdr)
        with self._lock:
            self._drained += frames
            self.counters.drained = len(self._drained)
            # Before the accounting: the queue holds the last relayed frames (QEMU may have
            # taken one or two in between); no need to walk the whole relay list.
            tail = (
                self._relayed_tail
                if self._rescue is not None
                else self._relayed[-len(self._drained) - 64 :]
            )
            if not _in_order_within(self._drained, tail):
                raise DatapathError(
                    f"{self.nic.nic_id}: tap queue holds frames netpass did not owe"
                )
        return len(frames)

    def drain_at_stop(self) -> int:
        """Stop relaying and empty the tap queue of the source QEMU that just stopped, while it
        saves the device state.

        QEMU drops the 0-2 frames it read during its own stop; if the migration then fails
        and the source runs again, the frames still in the tap queue would reach the guest
        before netpass could give those back. Drained here, they go back behind them, in
        order; and the resumed guest's used-idx then counts what it took before the stop,
        plus the one frame QEMU may have read before this drain and kept.
        """
        self.stop_relay()
        n = self.drain_tap()
        self._drained_at_stop = True
        return n

    def set_flush_point(self) -> None:
        """From now on the destination tap receives its own copy of broadcast/multicast (the
        first call counts: postcopy sets it before the stop, the accounting again after)."""
        with self._lock:
            if self._flush_ns is None:
                self._flush_ns = time.time_ns()

    def dest_running(self) -> None:
        """The destination VM runs: frames still captured here are owed to it now, so read
        them as they come. (Until then batching cost nothing: nothing could be delivered
        before RESUME, and fewer wake-ups leave the CPU to the QEMUs during the pause.) The
        frames taken so far reached a running guest's tap: no longer ours to give back."""
        with self._lock:
            self._dest_runs = True
            self._unconfirmed.clear()
        self._awake.set()

    def arrival_per_ms(self) -> float | None:
        """The rate frames arrived at since capture-on (None before it)."""
        if self._capture_on_t is None:
            return None
        elapsed_ms = max(1.0, (time.monotonic() - self._capture_on_t) * 1000)
        return self.counters.captured / elapsed_ms

    def take(self, max_frames: int = 256) -> list[bytes]:
        """Next owed frames, in order (only after `account`)."""
        self._raise_error()
        with self._lock:
            q = self._rescue
            if q is None:
                return []
            out = [q.popleft() for _ in range(min(max_frames, len(q)))]
            if not self._dest_runs:
                self._unconfirmed += out
            return out

    def quiet_for(self) -> float:
        """Seconds since the last frame was captured and nothing waits to be read (the relay
        thread may lag behind the socket: its last read alone says nothing)."""
        if self._sock is not None and self._sock.wait(0):
            return 0.0
        return time.monotonic() - self._last_capture

    # --- failure path ----------------------------------------------------------------------
    def give_back(self, used_idx_now: int | None) -> int:
        """The migration failed and the source VM runs again: re-deliver what it never got.

        USED_IDX_NOW is read once the resumed source has taken what QEMU and the tap queue still
        held; those were a suffix of the relayed frames, so the missing ones are exactly
        owed[0 : len(owed) - delivered]. Then the redirect goes away.
        """
        self._stop_thread()  # it would otherwise capture into what is being handed back
        assert self._sock is not None
        if self._rescue is None and self._drained_at_stop and used_idx_now is not None:
            # Stopped, drained, not accounted (two hosts account after the destination's
            # RESUME; the orchestrator sends FINAL first when it read the used-idx during the
            # stop): the resumed guest took nothing from the empty tap, so NOW is the stop's
            # used-idx plus the frame QEMU may have kept. Exact unless QEMU both dropped a
            # frame and kept a later one: then the dropped one is lost, the kept one doubled.
            with contextlib.suppress(DatapathError):  # inconsistent: give back what is here
                self.account(used_idx_now)
        with self._lock:
            self._relaying = False
            for fr in self._sock.recv_many(100000):  # what the paused thread left there
                self._classify(fr)
            if self._rescue is not None and used_idx_now is not None:
                # owed = [purged by the stop][held in QEMU's queue][tap queue]; netpass drained
                # the tap queue, so QEMU delivered only what it held, just before `drained`.
                delivered = (used_idx_now - self._used_last) & 0xFFFF
                owed = self._relayed_tail
                undrained = len(owed) - len(self._drained)
                missing = owed[: max(0, undrained - delivered)]
                rest = [*self._unconfirmed, *self._rescue][len(owed) :]
                self.counters.consumed += min(delivered, undrained)
                frames = [*missing, *self._drained, *rest]
            else:
                # Still relaying when it failed: relayed frames are in the tap queue of a running
                # VM and reach it; only the not yet relayed ones are owed (and those netpass
                # took out of the tap queue at the stop).
                frames = [*self._drained, *self._pending]
            # Handed back once: an ABORT after RESUMED gives back again, with nothing left.
            self._rescue = collections.deque()
            self._unconfirmed.clear()
            self._pending.clear()
            self._drained = []
            self._relayed_tail = []
        assert self._inj is not None
        for f in frames:
            self._inj.send(f)
        self.counters.returned += len(frames)
        # Frames captured just before the filter goes must not be overtaken by the first ones
        # that pass directly: those wait in the tap's hold (when it has one) meanwhile.
        hold = tc.Hold(self.nic.tap, netns=self.netns) if self._has_hold() else None
        if hold is not None:
            hold.close()
        self._unredirect()
        late = [fr.data for fr in self._sock.recv_many(100000)]
        for f in late:
            self._inj.send(f)
        if hold is not None:
            hold.open()
        self.counters.captured += len(late)
        self.counters.returned += len(late)
        return len(frames) + len(late)

    def _has_hold(self) -> bool:
        try:
            return tc.has_hold(self.nic.tap, netns=self.netns)
        except DatapathError:
            return False

    # --- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Remove everything netpass put on this host for the NIC; safe to call twice."""
        errors: list[str] = []
        for step in (self._unredirect, self._stop_thread, self._close_sockets):
            try:
                step()
            except (DatapathError, OSError) as e:
                errors.append(str(e))
        # An empty clsact is inert and deleting a qdisc on a live tap drops frames: it stays
        # (it goes with the tap when the source QEMU exits; `netpass cleanup` removes it).
        try:
            self.cap.delete()
        except (DatapathError, OSError) as e:
            errors.append(str(e))
        if errors:
            raise DatapathError("; ".join(errors))

    def _unredirect(self) -> None:
        if self._redirected:
            with contextlib.suppress(DatapathError):  # a tap that is gone took its filters along
                tc.del_egress_redirect(self.nic.tap, slot=self.slot, netns=self.netns)
            self._redirected = False

    def _stop_thread(self) -> None:
        self._stop.set()
        self._awake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _close_sockets(self) -> None:
        for obj in (self._sock, self._inj):
            if obj is not None:
                obj.close()
        self._sock = self._inj = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise DatapathError(f"{self.nic.nic_id} relay failed: {self._error}")

    # --- the relay thread --------------------------------------------------------------------
    def _run(self) -> None:
        name_this_thread(f"np-{self.nic.tap}")
        try:
            assert self._sock is not None and self._inj is not None
            while not self._stop.is_set():
                self._awake.wait()
                if not self._sock.wait(0.002):
                    continue
                # Stamped before the read too: between recv_many and the classification below
                # the socket is empty while the frames are in nobody's list yet, and
                # `quiet_for` must not call that quiet (a one-host run lost 18 rescued frames:
                # the delivery ended just then, after a pause's backlog was read in one go).
                self._last_capture = time.monotonic()
                if self._relaying or not self._dest_runs:
                    time.sleep(BATCH_S)  # let a batch gather
                frames = self._sock.recv_many(1024)
                if frames:
                    self._last_capture = time.monotonic()
                with self._lock:
                    for fr in frames:
                        self._classify(fr)
                    if self._relaying:
                        while self._pending:
                            f = self._pending[0]
                            self._inj.send(f)
                            self._pending.popleft()
                            self._relayed.append(f)
                            self.counters.relayed += 1
        except BaseException as e:  # reported to the orchestrator; never kills the migration
            self._error = e

    def _classify(self, fr: Frame) -> None:
        c = self.counters
        c.captured += 1
        data = fr.data
        if data[6:12] == self._mac:
            c.drop("own frame (the VM's own, flooded back)")
        elif not self.nic.rx_filter.accepts(data):
            c.drop("guest RX filter rejects it")
        elif (
            data[0] & BROADCAST_OR_MULTICAST
            and self._flush_ns is not None
            and fr.ts_ns >= self._flush_ns
        ):
            # The destination tap has its own copy, held for the guest: neither relayed to the
            # source guest (postcopy flushes before the stop) nor rescued.
            c.drop("flood also delivered at the destination")
        elif self._rescue is not None:
            self._rescue.append(data)
            c.rescued += 1
        else:
            self._pending.append(data)


def _in_order_within(part: list[bytes], whole: list[bytes]) -> bool:
    """PART is a subsequence of WHOLE (QEMU may take one frame while netpass drains)."""
    it = iter(whole)
    return all(any(f == g for g in it) for f in part)


class DestNic:
    """The destination tap: hold new frames, inject rescued ones first, then release."""

    def __init__(self, nic: NicInfo, qemu_pid: int, netns: str) -> None:
        self.nic = nic
        self.pid = qemu_pid
        self.netns = netns
        self.hold = tc.Hold(nic.tap, netns=netns)
        self._inj: Injector | None = None
        self._fd: int | None = None
        self._hdr = 0
        self.flood_discarded = 0
        self.injected = 0
        self._queue_len = 0  # the tap's txqueuelen
        self._pace: float | None = None
        self._hold_created = False

    def prepare(self) -> None:
        # The destination QEMU is paused (-S) and reads nothing, so grafting the root qdisc on
        # its tap loses nothing now; deleting it later on a busy tap can drop frames, so a hold
        # the host prepared in advance (`netpass prepare-tap`) is adopted and left in place.
        self._hold_created = not tc.has_hold(self.nic.tap, netns=self.netns)
        self.hold.install_open()
        self.hold.prepare_close()
        self._inj = Injector(self.nic.tap, netns=self.netns)
        self._queue_len = tc.txqueuelen(self.nic.tap, netns=self.netns)
        self._fd = tapfd.copy_fd(self.pid, self.nic.tap_fds[0])
        self._hdr = tapfd.vnet_hdr_size(self._fd)

    def close_and_flush(self) -> int:
        """Close the hold, then discard what queued in the tap before: floods the source also
        captured. The destination QEMU does not read its tap before it runs."""
        self.hold.close()
        return self._flush()

    def close_and_flush_prepared(self) -> bool:
        """`close_and_flush` in tens of microseconds, if the closing change prepared in
        `prepare` still applies (False: nothing done, use `close_and_flush`)."""
        if not self.hold.close_prepared():
            return False
        self._flush()
        return True

    def _flush(self) -> int:
        assert self._fd is not None
        self.flood_discarded = len(tapfd.drain(self._fd, self._hdr))
        return self.flood_discarded

    def set_catchup(self, c: Catchup) -> None:
        """How fast the frames the hold kept are released."""
        self._pace = c.per_ms

    def room_before_start(self) -> int:
        """Frames that still fit the tap queue while the VM has not run: QEMU reads nothing
        until then, and the hold keeps every other frame out of it."""
        return max(0, self._queue_len - 1 - self.injected)

    def inject(self, frames: list[bytes]) -> None:
        """Rescued frames, in order, unpaced (bypass: ahead of everything the hold keeps)."""
        assert self._inj is not None
        for f in frames:
            self._inj.send(f)
            self.injected += 1  # per frame: a failure part-way still counts what went in

    def release(self) -> int:
        """Open the hold (paced where the hold can pace); returns how many frames it had kept."""
        held = self.hold.stats().qlen if self.hold.closed else 0
        if held and self.hold.can_pace and self._pace:
            # New frames queue behind the held ones while the paced release lasts; the queue
            # shrinks at (pace - arrival rate), so this can take a while after a long pause.
            # Opening fully before it is drained would hand the guest the rest in one burst.
            self.hold.open(pace_per_ms=self._pace)
            self.hold.wait_drained(timeout=RELEASE_MAX_S)
        self.hold.open()
        return held

    def close(self) -> None:
        self.hold.drop_prepared()
        try:
            if self._hold_created:
                self.hold.remove()
            else:
                self.hold.open()
        finally:
            if self._inj is not None:
                self._inj.close()
                self._inj = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
