"""Reconnect backoff: capped exponential ceiling, full jitter."""

from __future__ import annotations

import random
import statistics

import pytest

from node.client import Backoff


def test_backoff_ceiling_doubles_from_initial_and_stops_at_maximum() -> None:
    b = Backoff(initial=0.5, maximum=30.0, factor=2.0)
    assert [b.ceiling(k) for k in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert b.ceiling(10_000) == 30.0  # no overflow for a device offline for days


def test_backoff_delays_stay_within_zero_and_the_ceiling() -> None:
    b = Backoff(initial=0.1, maximum=5.0)
    rng = random.Random(7)
    for attempt in range(20):
        for _ in range(50):
            d = b.delay(attempt, rng)
            assert 0.0 <= d <= b.ceiling(attempt)


def test_backoff_full_jitter_spreads_delays_over_the_whole_interval() -> None:
    # Full jitter: uniform on [0, ceiling] -- not "ceiling +- a little", which
    # would still bring a fleet back in lock-step.
    b = Backoff(initial=1.0, maximum=8.0)
    rng = random.Random(42)
    delays = [b.delay(3, rng) for _ in range(4000)]
    assert min(delays) < 0.05 * 8.0
    assert max(delays) > 0.95 * 8.0
    assert statistics.mean(delays) == pytest.approx(4.0, rel=0.05)
    # Every eighth of the interval gets a fair share (uniform: 500 each).
    buckets = [0] * 8
    for d in delays:
        buckets[min(int(d), 7)] += 1
    assert min(buckets) > 380, buckets


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"initial": 0.0}, "initial must be > 0 seconds, got 0.0"),
        ({"initial": 2.0, "maximum": 1.0}, "maximum must be >= initial (2.0), got 1.0"),
        ({"factor": 0.5}, "factor must be >= 1, got 0.5"),
    ],
)
def test_backoff_rejects_bad_parameters_naming_the_value(kwargs: dict[str, float], text: str) -> None:
    with pytest.raises(ValueError) as info:
        Backoff(**kwargs)
    assert text in str(info.value)
