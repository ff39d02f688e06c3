"""A Mastodon instance's status API on 127.0.0.1, as faithful as the tests need.

``POST /api/v1/statuses`` (JSON or form) with ``Authorization: Bearer``: 401 ``{"error": "The
access token is invalid"}`` for another token; 422 ``{"error": "Validation failed: Text character
limit of N exceeded"}`` for a status over the limit (every http(s) URL counted as 23, as
Mastodon counts); an ``Idempotency-Key`` seen before answers with the status it made then, and
posts nothing; every answer carries ``X-RateLimit-Limit``, ``-Remaining`` and ``-Reset`` (ISO
8601), and once the budget is spent, 429 ``{"error": "Too many requests"}``. It counts rather
than reimplements our rules: its own length check is written here, not imported.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

URL = re.compile(r"https?://\S+")


@dataclass
class Instance:
    token: str = "good-token"
    max_characters: int = 500
    rate_limit: int = 300
    remaining: int = 300
    reset_in: timedelta = timedelta(minutes=5)
    # Make the status, then close the connection without answering: a lost answer.
    drop_answers: int = 0
    statuses: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    by_key: dict[str, dict[str, Any]] = field(default_factory=dict)


class FakeMastodon:
    def __init__(self) -> None:
        self.instance = Instance()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeMastodon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                with fake._lock:
                    status, body, drop = fake._post(self.path, dict(self.headers.items()), raw)
                if drop:
                    self.close_connection = True
                    return
                instance = fake.instance
                reset = (datetime.now(UTC) + instance.reset_in).isoformat().replace("+00:00", "Z")
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json; charset=utf-8")
                self.send_header("content-length", str(len(payload)))
                self.send_header("x-ratelimit-limit", str(instance.rate_limit))
                self.send_header("x-ratelimit-remaining", str(max(instance.remaining, 0)))
                self.send_header("x-ratelimit-reset", reset)
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def _post(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, Any], bool]:
        instance = self.instance
        lower = {name.lower(): value for name, value in headers.items()}
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
            return 200, instance.by_key[key], False
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
            instance.by_key[key] = status
        if instance.drop_answers > 0:
            instance.drop_answers -= 1
            return 0, {}, True
        return 200, status, False
