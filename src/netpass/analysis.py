"""Loss, blackout and latency figures from one probe stream. Pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

from netpass.errors import UsageError
from netpass.results import ProbeData


@dataclass(frozen=True)
class LostRun:
    """A maximal run of consecutive lost sequence numbers first_seq..last_seq (inclusive)."""

    first_seq: int
    last_seq: int
    count: int
    first_send_ns: int  # send time of first_seq
    last_send_ns: int  # send time of last_seq

    @property
    def span_ms(self) -> float:
        return (self.last_send_ns - self.first_send_ns) / 1e6


@dataclass(frozen=True)
class RttStats:
    """Round-trip times (ms) of first replies; all None when count == 0."""

    count: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None


@dataclass(frozen=True)
class ProbeStats:
    """What one probe stream says about connectivity. See `analyze` for exact definitions."""

    sent: int
    received: int
    lost: int
    duplicates: int
    reordered: int
    longest_gap_ms: float | None
    gap_start_ns: int | None
    gap_end_ns: int | None
    lost_runs: tuple[LostRun, ...]
    window_start_ns: int | None
    window_end_ns: int | None
    sent_in_window: int
    lost_in_window: int
    lost_outside_window: int
    rtt: RttStats
    rtt_in_window: RttStats
    # The first reordered replies as (seq, highest seq before it, ms after the window start):
    # where to look when a run reorders.
    reordered_at: tuple[tuple[int, int, float | None], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lost_runs"] = [asdict(r) for r in self.lost_runs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeStats:
        return cls(
            **{
                **d,
                "lost_runs": tuple(LostRun(**r) for r in d["lost_runs"]),
                "rtt": RttStats(**d["rtt"]),
                "rtt_in_window": RttStats(**d["rtt_in_window"]),
                "reordered_at": tuple(tuple(r) for r in d.get("reordered_at", ())),
            }
        )


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of values <= it."""
    if not sorted_values:
        raise UsageError("percentile of an empty sequence")
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def rtt_stats(rtts_ms: Sequence[float]) -> RttStats:
    if not rtts_ms:
        return RttStats()
    s = sorted(rtts_ms)
    return RttStats(len(s), percentile(s, 50), percentile(s, 99), s[-1])


def analyze(
    data: ProbeData,
    stop_ns: int | None = None,
    resume_ns: int | None = None,
    margin_ms: float = 20.0,
) -> ProbeStats:
    """Summarise a probe stream. Definitions (seq = the probe's u64 sequence number):

    - sent: len(data.send_ns); seqs 0..sent-1 were sent. Replies naming a seq outside that
      range cannot be ours and are ignored entirely.
    - received: number of distinct seqs with at least one reply.
    - lost: sent - received (so sent == received + lost always holds).
    - duplicates: replies beyond the first one for their seq.
    - reordered: first replies (duplicates excluded), in arrival order as listed in
      data.replies, whose seq is lower than the highest seq received before them.
    - longest gap: the largest interval between two consecutive reply arrivals (all replies,
      duplicates included, sorted by arrival time) - the longest time nothing came back.
      gap_start_ns/gap_end_ns are the arrivals bounding it. None with fewer than 2 replies.
      Silence before the first or after the last reply is not a gap between arrivals.
    - lost_runs: every maximal run of consecutive lost seqs, in seq order.
    - window: [stop_ns - margin, resume_ns + margin] (inclusive), by echo SEND time. Only
      defined when both stop_ns and resume_ns are given; otherwise window_* are None,
      sent_in_window and lost_in_window are 0 and every loss counts as outside.
    - sent_in_window / lost_in_window: echoes sent inside the window / of those, the lost ones.
      lost_outside_window = lost - lost_in_window.
    - rtt: arrival time of the first reply minus send time, in ms, over all received seqs;
      p50/p99 are nearest-rank percentiles. rtt_in_window: same, restricted to seqs sent
      inside the window.
    """
    if not margin_ms >= 0:
        raise UsageError(f"margin_ms must be >= 0, got {margin_ms}")
    send_ns = data.send_ns
    sent = len(send_ns)

    first_arrival: dict[int, int] = {}
    arrivals: list[int] = []
    duplicates = reordered = 0
    reordered_at: list[tuple[int, int, int]] = []
    highest = -1
    for seq, t_ns in data.replies:
        if not 0 <= seq < sent:
            continue
        arrivals.append(t_ns)
        if seq in first_arrival:
            duplicates += 1
            continue
        first_arrival[seq] = t_ns
        if seq < highest:
            reordered += 1
            if len(reordered_at) < 8:
                reordered_at.append((seq, highest, t_ns))
        else:
            highest = seq
    received = len(first_arrival)

    gap_start = gap_end = None
    arrivals.sort()
    for a, b in pairwise(arrivals):
        if gap_start is None or gap_end is None or b - a > gap_end - gap_start:
            gap_start, gap_end = a, b
    gap_ms = None if gap_start is None or gap_end is None else (gap_end - gap_start) / 1e6

    lost_runs: list[LostRun] = []
    run_start: int | None = None
    for seq in range(sent + 1):  # one past the end closes a trailing run
        lost = seq < sent and seq not in first_arrival
        if lost and run_start is None:
            run_start = seq
        elif not lost and run_start is not None:
            last = seq - 1
            lost_runs.append(
                LostRun(run_start, last, last - run_start + 1, send_ns[run_start], send_ns[last])
            )
            run_start = None

    win_start = win_end = None
    sent_in = lost_in = 0
    win_rtts: list[float] = []
    if stop_ns is not None and resume_ns is not None:
        margin_ns = round(margin_ms * 1e6)
        win_start, win_end = stop_ns - margin_ns, resume_ns + margin_ns
        for seq, t_send in enumerate(send_ns):
            if win_start <= t_send <= win_end:
                sent_in += 1
                arr = first_arrival.get(seq)
                if arr is None:
                    lost_in += 1
                else:
                    win_rtts.append((arr - t_send) / 1e6)

    lost_total = sent - received
    return ProbeStats(
        sent=sent,
        received=received,
        lost=lost_total,
        duplicates=duplicates,
        reordered=reordered,
        longest_gap_ms=gap_ms,
        gap_start_ns=gap_start,
        gap_end_ns=gap_end,
        lost_runs=tuple(lost_runs),
        window_start_ns=win_start,
        window_end_ns=win_end,
        sent_in_window=sent_in,
        lost_in_window=lost_in,
        lost_outside_window=lost_total - lost_in,
        rtt=rtt_stats([(t - send_ns[s]) / 1e6 for s, t in first_arrival.items()]),
        rtt_in_window=rtt_stats(win_rtts),
        reordered_at=tuple(
            (seq, hi, None if win_start is None else round((t - win_start) / 1e6, 2))
            for seq, hi, t in reordered_at
        ),
    )


SILENT_TAIL_MS = 300.0


def silent_at_end(probe: ProbeData, tail_ms: float = SILENT_TAIL_MS) -> bool:
    """True if no reply arrived during the last TAIL_MS of sending: the target stopped
    answering (in the lab: the guest died or hung after the migration) rather than lost a few
    frames. A probe shorter than TAIL_MS says nothing and counts as answering."""
    if not probe.send_ns or probe.send_ns[-1] - probe.send_ns[0] < tail_ms * 1e6:
        return False
    cutoff = probe.send_ns[-1] - round(tail_ms * 1e6)
    return not any(t >= cutoff for _, t in probe.replies)
