"""Retry timing for deferred deliveries: exponential backoff with jitter, and queue expiry."""

from __future__ import annotations

import random

FIRST_DELAY = 300.0  # seconds before the first retry
MAX_DELAY = 3600.0  # the nominal delay stops growing here
JITTER = 0.1  # +-10%, so messages deferred together (e.g. after a restart) spread out


def next_delay(attempts: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1 = the first attempt failed).

    The nominal delay doubles from 5 minutes to a 1 hour cap, then each value is moved by up to
    10% either way:

    ========  =========  ===============
    attempts  nominal    with jitter
    ========  =========  ===============
    1         5 min      4.5 - 5.5 min
    2         10 min     9 - 11 min
    3         20 min     18 - 22 min
    4         40 min     36 - 44 min
    5 and on  60 min     54 - 66 min
    ========  =========  ===============

    Pass a seeded `rng` for a deterministic result; None uses the module's shared generator.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    # Clamping the exponent keeps 2**n small for queues that have been retried for days.
    nominal = min(FIRST_DELAY * 2.0 ** min(attempts - 1, 16), MAX_DELAY)
    factor = (rng or random).uniform(1.0 - JITTER, 1.0 + JITTER)
    return nominal * factor


def expired(first_queued_at: float, now: float, max_lifetime: float) -> bool:
    """Whether a message queued at `first_queued_at` (epoch seconds) should now be given up."""
    return now - first_queued_at >= max_lifetime
