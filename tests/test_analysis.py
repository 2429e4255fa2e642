from __future__ import annotations

from collections.abc import Collection

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netpass.analysis import LostRun, ProbeStats, analyze, percentile, silent_at_end
from netpass.errors import UsageError
from netpass.results import ProbeData

T0 = 1_700_000_000_000_000_000
MS = 1_000_000
RTT = MS // 2


def stream(n: int, lost: Collection[int] = (), order: list[int] | None = None) -> ProbeData:
    """n echoes 1 ms apart; every seq not in `lost` answered 0.5 ms later, in `order`."""
    send = [T0 + i * MS for i in range(n)]
    seqs = order if order is not None else [i for i in range(n) if i not in lost]
    replies = [(s, send[s] + RTT) for s in seqs]
    return ProbeData("10.0.0.2", 1000, 56, send, replies)


def test_clean_stream() -> None:
    s = analyze(stream(100))
    assert (s.sent, s.received, s.lost, s.duplicates, s.reordered) == (100, 100, 0, 0, 0)
    assert s.lost_runs == ()
    assert s.longest_gap_ms == pytest.approx(1.0)
    assert s.rtt.count == 100
    assert s.rtt.p50_ms == s.rtt.p99_ms == s.rtt.max_ms == pytest.approx(0.5)
    assert s.window_start_ns is None and s.lost_in_window == 0 and s.sent_in_window == 0


def test_losses_inside_and_outside_window() -> None:
    lost = {10, 11, 12, 50, 51, 90}
    # STOP at seq 48, RESUME at seq 53, margin 2 ms -> window covers sends of seqs 46..55.
    s = analyze(stream(100, lost), stop_ns=T0 + 48 * MS, resume_ns=T0 + 53 * MS, margin_ms=2)
    assert (s.sent, s.received, s.lost) == (100, 94, 6)
    assert s.window_start_ns == T0 + 46 * MS and s.window_end_ns == T0 + 55 * MS
    assert s.sent_in_window == 10
    assert s.lost_in_window == 2
    assert s.lost_outside_window == 4
    assert s.lost_runs == (
        LostRun(10, 12, 3, T0 + 10 * MS, T0 + 12 * MS),
        LostRun(50, 51, 2, T0 + 50 * MS, T0 + 51 * MS),
        LostRun(90, 90, 1, T0 + 90 * MS, T0 + 90 * MS),
    )
    # Replies of 9 and 13 are the arrivals around the longest silence.
    assert s.longest_gap_ms == pytest.approx(4.0)
    assert s.gap_start_ns == T0 + 9 * MS + RTT and s.gap_end_ns == T0 + 13 * MS + RTT
    assert s.rtt_in_window.count == 8


def test_no_window_when_stop_or_resume_missing() -> None:
    s = analyze(stream(20, {5}), stop_ns=T0 + 5 * MS, resume_ns=None)
    assert s.window_start_ns is None
    assert (s.lost_in_window, s.lost_outside_window) == (0, 1)
    assert s.rtt_in_window.count == 0 and s.rtt_in_window.p50_ms is None


def test_duplicates_counted_once() -> None:
    d = stream(10)
    d.replies += [(3, T0 + 20 * MS), (3, T0 + 21 * MS), (7, T0 + 22 * MS)]
    s = analyze(d)
    assert (s.received, s.lost, s.duplicates, s.reordered) == (10, 0, 3, 0)


def test_reordering_first_copies_only() -> None:
    order = [0, 1, 3, 2, 4, 6, 5, 7]
    s = analyze(stream(8, order=order))
    assert (s.received, s.lost, s.reordered, s.duplicates) == (8, 0, 2, 0)
    assert [(seq, hi) for seq, hi, _ in s.reordered_at] == [(2, 3), (5, 6)]
    assert ProbeStats.from_dict(s.to_dict()) == s
    # A late duplicate of an old seq is a duplicate, not a reordering.
    d = stream(8)
    d.replies.append((1, T0 + 50 * MS))
    s = analyze(d)
    assert (s.duplicates, s.reordered) == (1, 0)


def test_empty_stream() -> None:
    s = analyze(ProbeData("10.0.0.2", 1000, 56, [], []), stop_ns=T0, resume_ns=T0 + MS)
    assert (s.sent, s.received, s.lost, s.duplicates, s.reordered) == (0, 0, 0, 0, 0)
    assert s.longest_gap_ms is None and s.lost_runs == ()
    assert s.rtt.count == 0 and s.rtt.max_ms is None
    assert s.sent_in_window == s.lost_in_window == 0


def test_all_lost() -> None:
    s = analyze(stream(50, set(range(50))), stop_ns=T0, resume_ns=T0 + 49 * MS, margin_ms=0)
    assert (s.sent, s.received, s.lost) == (50, 0, 50)
    assert s.lost_runs == (LostRun(0, 49, 50, T0, T0 + 49 * MS),)
    assert (s.lost_in_window, s.lost_outside_window) == (50, 0)
    assert s.longest_gap_ms is None
    assert s.rtt.count == 0


def test_foreign_seqs_ignored() -> None:
    d = stream(5)
    d.replies.append((99, T0))
    d.replies.append((-1, T0))
    s = analyze(d)
    assert (s.sent, s.received, s.lost, s.duplicates) == (5, 5, 0, 0)


def test_percentile_nearest_rank() -> None:
    vals = [float(i) for i in range(1, 101)]
    assert percentile(vals, 50) == 50.0
    assert percentile(vals, 99) == 99.0
    assert percentile(vals, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(UsageError):
        percentile([], 50)


def test_negative_margin_rejected() -> None:
    with pytest.raises(UsageError):
        analyze(stream(3), margin_ms=-1)


def test_stats_dict_round_trip() -> None:
    s = analyze(stream(30, {3, 4, 20}), stop_ns=T0 + 3 * MS, resume_ns=T0 + 5 * MS)
    assert ProbeStats.from_dict(s.to_dict()) == s


@given(
    n=st.integers(0, 60),
    replies=st.lists(st.tuples(st.integers(-3, 70), st.integers(0, 10**9)), max_size=150),
    stop=st.none() | st.integers(0, 10**9),
    pause=st.none() | st.integers(0, 10**8),
)
def test_accounting_property(
    n: int, replies: list[tuple[int, int]], stop: int | None, pause: int | None
) -> None:
    data = ProbeData("10.0.0.2", 1000, 56, [i * 10**7 for i in range(n)], replies)
    resume = None if stop is None or pause is None else stop + pause
    s = analyze(data, stop, resume)
    assert s.sent == n == s.received + s.lost
    assert s.duplicates >= 0 and s.reordered >= 0 and s.lost >= 0
    assert s.reordered <= s.received
    assert s.lost_in_window + s.lost_outside_window == s.lost
    assert 0 <= s.lost_in_window <= s.sent_in_window <= s.sent
    assert sum(r.count for r in s.lost_runs) == s.lost
    valid = [r for r in replies if 0 <= r[0] < n]
    assert s.received + s.duplicates == len(valid)


def test_silent_at_end() -> None:
    assert not silent_at_end(stream(1000))
    assert not silent_at_end(stream(1000, lost=range(800, 990)))  # answers again at the end
    assert silent_at_end(stream(1000, lost=range(650, 1000)))  # died: nothing for 350 ms
    assert not silent_at_end(stream(200, lost=range(200)))  # too short to tell
