"""The destination's release pace for the frames its hold kept."""

from __future__ import annotations

import pytest

from netpass.switchover import CATCHUP_MIN_PER_MS, catchup_for


@pytest.mark.parametrize(
    "rate,per_ms",
    [
        (None, CATCHUP_MIN_PER_MS),  # unknown rate: as at rest
        (0.0, 6.0),
        (1.0, 6.0),  # 1000 pps
        (5.0, 6.0),  # 5000 pps: 1.2 x 5 = 6
        (10.0, 12.0),  # 10000 pps
        (100.0, 120.0),
    ],
)
def test_catchup_for(rate: float | None, per_ms: float) -> None:
    assert catchup_for(rate).per_ms == pytest.approx(per_ms)


def test_pace_never_falls_with_load() -> None:
    paces = [catchup_for(r / 10).per_ms for r in range(0, 300)]
    assert paces == sorted(paces)


def test_concurrent_migrations_share_the_budget() -> None:
    assert catchup_for(1.0, sharing=4).per_ms == pytest.approx(CATCHUP_MIN_PER_MS / 4)
    # Never slower than the frames arrive (x CATCHUP_FACTOR), however many share.
    assert catchup_for(10.0, sharing=4).per_ms == pytest.approx(12.0)
    assert catchup_for(10.0, sharing=100).per_ms == pytest.approx(12.0)
