"""The retry schedule, as the pure function it is."""

from __future__ import annotations

import random

import pytest

from mailrelay.delivery.retry import expired, next_delay

MINUTE = 60.0
NOMINAL = {1: 5 * MINUTE, 2: 10 * MINUTE, 3: 20 * MINUTE, 4: 40 * MINUTE, 5: 60 * MINUTE}


@pytest.mark.parametrize(("attempts", "nominal"), sorted(NOMINAL.items()))
def test_each_delay_is_within_ten_percent_of_the_schedule(attempts: int, nominal: float) -> None:
    rng = random.Random(attempts)
    for _ in range(500):
        assert 0.9 * nominal <= next_delay(attempts, rng) <= 1.1 * nominal


def test_first_retry_is_about_five_minutes() -> None:
    assert 270.0 <= next_delay(1, random.Random(0)) <= 330.0


def test_delays_grow_then_stop_at_one_hour() -> None:
    # The extremes of the jitter range: growth holds even for the unluckiest draws until the cap.
    class Low(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return a

    class High(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    lows = [next_delay(n, Low()) for n in range(1, 8)]
    highs = [next_delay(n, High()) for n in range(1, 8)]
    assert lows == sorted(lows)
    assert all(high < low_next for high, low_next in zip(highs[:2], lows[2:4], strict=True))
    assert lows[4:] == [0.9 * 3600.0] * 3
    assert highs[4:] == [1.1 * 3600.0] * 3


def test_cap_holds_for_very_old_messages() -> None:
    rng = random.Random(1)
    for attempts in (6, 50, 10_000, 10**9):
        assert 0.9 * 3600.0 <= next_delay(attempts, rng) <= 1.1 * 3600.0


def test_jitter_spreads_values() -> None:
    rng = random.Random(7)
    values = {round(next_delay(3, rng), 3) for _ in range(100)}
    assert len(values) > 90
    assert min(values) < 20 * MINUTE < max(values)


def test_seeded_rng_is_deterministic() -> None:
    first = [next_delay(n, random.Random(42)) for n in range(1, 10)]
    second = [next_delay(n, random.Random(42)) for n in range(1, 10)]
    assert first == second


def test_default_rng_works() -> None:
    assert 270.0 <= next_delay(1) <= 330.0


@pytest.mark.parametrize("attempts", [0, -1])
def test_attempts_start_at_one(attempts: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        next_delay(attempts)


def test_expired() -> None:
    five_days = 5 * 86400.0
    assert not expired(1000.0, 1000.0, five_days)
    assert not expired(1000.0, 1000.0 + five_days - 1, five_days)
    assert expired(1000.0, 1000.0 + five_days, five_days)
    assert expired(1000.0, 1000.0 + five_days + 1, five_days)
