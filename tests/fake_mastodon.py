"""A Mastodon instance's status API on 127.0.0.1, as faithful as the tests need.

``POST /api/v1/statuses`` (JSON or form) with ``Authorization: Bearer``: 401 ``{"error": "The
access token is invalid"}`` for another token; 422 ``{"error": "Validation failed: Text character
limit of N exceeded"}`` for a status over the limit (every http(s) URL counted as 23, as
Mastodon counts). An ``Idempotency-Key`` seen in the last hour answers with the status it made
then, and posts nothing; one older than that is forgotten and the request posts again, as
Mastodon's PostStatusService keeps the key with ``redis.setex(idempotency_key, 3_600,
@status.id)`` once the status is made (``Instance.clock`` moves the fake's time). Every answer
carries ``X-RateLimit-Limit``, ``-Remaining`` and ``-Reset`` (ISO 8601), and once the budget is
spent, 429 ``{"error": "Too many requests"}``. It counts rather than reimplements our rules: its
own length check is written here, not imported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import Message
from typing import Any
from urllib.parse import parse_qs

from tests.fake_api import FakeJsonApi, Reply

URL = re.compile(r"https?://\S+")
KEY_LIFETIME = timedelta(seconds=3600)


@dataclass
class Instance:
    token: str = "good-token"
    max_characters: int = 500
    rate_limit: int = 300
    remaining: int = 300
    reset_in: timedelta = timedelta(minutes=5)
    # Make the status, then close the connection without answering: a lost answer.
    drop_answers: int = 0
    # Make the status, keep its key, then answer this 5xx: post-processing failed after the status
    # was made (PostStatusService keeps the key right after process_status!, before post-processing).
    error_after_posting: int | None = None
    # Answer this 5xx without reaching the instance, as its reverse proxy does when it is down.
    unavailable: int | None = None
    statuses: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Idempotency key -> (the status it made, when).
    by_key: dict[str, tuple[dict[str, Any], datetime]] = field(default_factory=dict)
    # How far the fake's clock is ahead of the real one.
    clock: timedelta = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.clock


class FakeMastodon(FakeJsonApi):
    content_type = "application/json; charset=utf-8"

    def __init__(self) -> None:
        super().__init__()
        self.instance = Instance()

    def post(self, path: str, headers: Message, raw: bytes) -> Reply:
        status, body, drop = self._post(path, dict(headers.items()), raw)
        instance = self.instance
        rate = {
            "x-ratelimit-limit": str(instance.rate_limit),
            "x-ratelimit-remaining": str(max(instance.remaining, 0)),
            "x-ratelimit-reset": (datetime.now(UTC) + instance.reset_in).isoformat().replace("+00:00", "Z"),
        }
        return Reply(status, body, rate, drop=drop)

    def _post(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, Any], bool]:
        instance = self.instance
        lower = {name.lower(): value for name, value in headers.items()}
        if instance.unavailable:
            return instance.unavailable, {"error": "Bad Gateway"}, False
        if path != "/api/v1/statuses":
            return 404, {"error": "Record not found"}, False
        if lower.get("authorization") != f"Bearer {instance.token}":
            return 401, {"error": "The access token is invalid"}, False
        if instance.remaining <= 0:
            return 429, {"error": "Too many requests"}, False
        instance.remaining -= 1
        if lower.get("content-type", "").startswith("application/json"):
            form = json.loads(raw)
        else:
            form = {key: values[0] for key, values in parse_qs(raw.decode()).items()}
        instance.requests.append({"headers": lower, "form": form})
        key = lower.get("idempotency-key")
        if key and key in instance.by_key:
            made, at = instance.by_key[key]
            if instance.now() - at < KEY_LIFETIME:
                return 200, made, False
            del instance.by_key[key]  # Redis let it expire
        text = str(form.get("status") or "")
        if not text.strip():
            return 422, {"error": "Validation failed: Text can't be blank"}, False
        length = len(URL.sub("x" * 23, text))
        if length > instance.max_characters:
            return (
                422,
                {"error": f"Validation failed: Text character limit of {instance.max_characters} exceeded"},
                False,
            )
        number = str(109_000_000_000 + len(instance.statuses))
        status = {
            "id": number,
            "url": f"{self.base_url}/@wordclaw/{number}",
            "uri": f"{self.base_url}/users/wordclaw/statuses/{number}",
            "visibility": form.get("visibility", "public"),
            "content": f"<p>{text}</p>",
        }
        instance.statuses.append({**status, "text": text})
        if key:
            instance.by_key[key] = (status, instance.now())
        if instance.drop_answers > 0:
            instance.drop_answers -= 1
            return 0, {}, True
        if instance.error_after_posting:
            return instance.error_after_posting, {"error": "We're sorry, but something went wrong on our end."}, False
        return 200, status, False
