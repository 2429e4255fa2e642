"""Clock offset between two hosts, NTP style, over the channel's PING/PONG.

Each round gives ``wire.clock_offset`` a (t1, t2, t3, t4) quadruple. Queueing only ever adds
delay, and the error of one sample is at most half its delay, so the sample with the smallest
delay is the most trustworthy; averaging would mix in the noisy ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from netpass import wire

__all__ = ["ClockEstimate", "Pinger", "best_sample", "estimate_offset"]


class Pinger(Protocol):
    async def ping(self, timeout: float = ...) -> wire.ClockSample: ...


@dataclass(frozen=True, slots=True)
class ClockEstimate:
    offset_ns: int  # peer clock minus local clock
    uncertainty_ns: int  # half the round trip of the best sample: |error| <= this
    delay_ns: int  # that best sample's round trip, the peer's turnaround excluded
    rounds: int  # samples taken

    def to_local(self, peer_ns: int) -> int:
        """A peer timestamp expressed on the local clock."""
        return peer_ns - self.offset_ns


def best_sample(samples: Iterable[wire.ClockSample]) -> ClockEstimate:
    """The estimate from the smallest-delay sample; ValueError if there are none."""
    taken = list(samples)
    if not taken:
        raise ValueError("no clock samples")
    best = min(taken, key=lambda s: s.delay_ns)
    return ClockEstimate(
        offset_ns=best.offset_ns,
        uncertainty_ns=best.uncertainty_ns,
        delay_ns=best.delay_ns,
        rounds=len(taken),
    )


async def estimate_offset(
    channel: Pinger, *, rounds: int = 8, interval: float = 0.002, timeout: float = 5.0
) -> ClockEstimate:
    """Run ``rounds`` PING/PONG exchanges and keep the one with the smallest delay.

    The peer answers from its recv() loop (Channel does that automatically). ``interval``
    spaces the rounds so that one burst of queueing does not spoil them all.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    samples: list[wire.ClockSample] = []
    for i in range(rounds):
        if i and interval > 0:
            await asyncio.sleep(interval)
        samples.append(await channel.ping(timeout))
    return best_sample(samples)
