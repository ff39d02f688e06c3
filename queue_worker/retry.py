"""When a failed attempt is tried again."""

from __future__ import annotations

import random

# Svix's schedule: quick first retries for blips, then spacing out over about a day and a half.
SCHEDULE_SECONDS = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 10 * 3600)
JITTER = 0.1
MAX_RETRY_AFTER_SECONDS = 24 * 3600


def retry_delay(attempt: int, retry_after: float | None = None, *, rng: random.Random | None = None) -> float:
    """Seconds before retrying after failed attempt number ``attempt`` (1-based).

    ±10 % jitter spreads retries of jobs that failed together. A server's Retry-After is
    honoured when it asks for longer than the schedule, up to a day.
    """
    base = SCHEDULE_SECONDS[min(max(attempt, 1), len(SCHEDULE_SECONDS)) - 1]
    delay = base * (rng or random).uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
    return delay
