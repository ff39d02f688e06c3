"""What an HTTP channel's answer says about slowing down: Retry-After and rate-limit headers.

Headers are looked up by their lower-case names: pass an answer's own headers (``Answer.headers``
from wordclaw_mcp/http.py, which are case-insensitive) or a plain mapping with lower-case keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

# Above this, an integer X-RateLimit-Reset is a Unix time; below, seconds from now.
_EPOCH_THRESHOLD = 10**9


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a Retry-After header (seconds or an HTTP date) asks for, or None."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def rate_limit_reset(value: str | None, now: datetime | None = None) -> datetime | None:
    """When an X-RateLimit-Reset header (Unix time, seconds, or ISO 8601 as Mastodon sends) falls."""
    if not value or not value.strip():
        return None
    now = now or datetime.now(UTC)
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return None
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    if number >= _EPOCH_THRESHOLD:
        return datetime.fromtimestamp(number, UTC)
    return now + timedelta(seconds=max(number, 0.0))


def throttle(status: int, headers: Mapping[str, str], now: datetime | None = None) -> tuple[bool, datetime | None]:
    """Whether an answer asks the sender to slow down, and until when (None: the channel named no time).

    A 429 always throttles; a 503 only with Retry-After (otherwise it is an ordinary outage);
    and an exhausted rate limit (X-RateLimit-Remaining: 0) throttles even a success, so the
    target rests before it answers 429.
    """
    now = now or datetime.now(UTC)
    seconds = retry_after(headers.get("retry-after"), now)
    if status == 429 and seconds is None:
        # Mastodon, X and Bluesky name the time in a rate-limit reset header alone.
        reset = rate_limit_reset(_rate_limit_header(headers, "reset"), now)
        return True, reset if reset is not None and reset > now else None
    if status == 429 or (status == 503 and seconds is not None):
        return True, None if seconds is None else now + timedelta(seconds=seconds)
    remaining = _rate_limit_header(headers, "remaining")
    if remaining is not None and remaining.strip() == "0":
        reset = rate_limit_reset(_rate_limit_header(headers, "reset"), now)
        if reset is not None and reset > now:
            return True, reset
    return False, None


def _rate_limit_header(headers: Mapping[str, str], name: str) -> str | None:
    """A rate-limit header by any of its spellings: X-RateLimit-* (Mastodon, GitHub),
    X-Rate-Limit-* (X) and RateLimit-* (Bluesky, the IETF draft)."""
    for prefix in ("x-ratelimit-", "x-rate-limit-", "ratelimit-"):
        if (value := headers.get(prefix + name)) is not None:
            return value
    return None
