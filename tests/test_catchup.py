"""The destination's catch-up plan: a burst that shrinks with the load, then a paced rest."""

from __future__ import annotations

import pytest

from netpass.switchover import (
    CATCHUP_BURST_MAX,
    CATCHUP_BURST_MIN,
    CATCHUP_MIN_PER_MS,
    catchup_for,
)


@pytest.mark.parametrize(
    "rate,burst,per_ms",
    [
        (None, CATCHUP_BURST_MAX, CATCHUP_MIN_PER_MS),  # unknown rate: as at rest
        (0.0, 64, 6.0),
        (1.0, 60, 6.0),  # 1000 pps
        (5.0, 44, 6.0),  # 5000 pps: 1.2 x 5 = 6
        (10.0, 24, 12.0),  # 10000 pps
        (100.0, CATCHUP_BURST_MIN, 120.0),  # the burst never goes below its floor
    ],
)
def test_catchup_for(rate: float | None, burst: int, per_ms: float) -> None:
    c = catchup_for(rate)
    assert c.burst == burst
    assert c.per_ms == pytest.approx(per_ms)


def test_burst_never_grows_with_load() -> None:
    bursts = [catchup_for(r / 10).burst for r in range(0, 300)]
    assert bursts == sorted(bursts, reverse=True)
    assert all(CATCHUP_BURST_MIN <= b <= CATCHUP_BURST_MAX for b in bursts)


def test_concurrent_migrations_share_the_budget() -> None:
    one, four = catchup_for(1.0), catchup_for(1.0, sharing=4)
    assert four.per_ms == pytest.approx(CATCHUP_MIN_PER_MS / 4)
    assert four.burst == one.burst // 4
    # Never slower than the frames arrive (x CATCHUP_FACTOR), however many share.
    assert catchup_for(10.0, sharing=4).per_ms == pytest.approx(12.0)
    assert catchup_for(10.0, sharing=100).burst == CATCHUP_BURST_MIN // 2
