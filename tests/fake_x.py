"""X's API v2 post endpoint on 127.0.0.1, as faithful as the tests need.

``POST /2/tweets`` with ``Authorization: Bearer`` and JSON ``{"text"}``: 201 ``{"data": {"id",
"text", "edit_history_tweet_ids"}}``; 401 and 403 with X's problem bodies (``title``, ``detail``,
``type``, ``status``), 403 for a duplicate of an earlier post; 400 for a text over 280 (ASCII
counted plainly, URLs as 23: the tests' texts are ASCII); every answer carries
``x-rate-limit-limit``, ``-remaining`` and ``-reset`` (Unix seconds), and a spent budget answers
429. ``hang`` makes the post and then never answers, as a lost answer looks to the client.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

URL = re.compile(r"https?://\S+")


@dataclass
class Account:
    token: str = "x-token"
    remaining: int = 100
    reset_in: float = 900.0
    hang: bool = False
    posts: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0


class FakeX:
    def __init__(self) -> None:
        self.account = Account()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeX:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
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
                    status, body = fake._post(self.path, self.headers.get("authorization"), raw)
                    hang = fake.account.hang and status == 201
                if hang:
                    fake._closing.wait(30)
                    return
                account = fake.account
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json; charset=utf-8")
                self.send_header("content-length", str(len(payload)))
                self.send_header("x-rate-limit-limit", "100")
                self.send_header("x-rate-limit-remaining", str(max(account.remaining, 0)))
                self.send_header("x-rate-limit-reset", str(int(time.time() + account.reset_in)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def _post(self, path: str, authorization: str | None, raw: bytes) -> tuple[int, dict[str, Any]]:
        account = self.account
        account.requests += 1
        if path != "/2/tweets":
            return 404, _problem(404, "Not Found Error", "The requested resource could not be found.")
        if authorization != f"Bearer {account.token}":
            return 401, _problem(401, "Unauthorized", "Unauthorized")
        if account.remaining <= 0:
            return 429, _problem(429, "Too Many Requests", "Too Many Requests")
        account.remaining -= 1
        text = str(json.loads(raw).get("text") or "")
        if len(URL.sub("x" * 23, text)) > 280:
            return 400, {
                "errors": [{"parameters": {"text": [text]}, "message": "Your Tweet text is too long."}],
                "title": "Invalid Request",
                "detail": "One or more parameters to your request was invalid.",
                "type": "https://api.twitter.com/2/problems/invalid-request",
            }
        if any(post["text"] == text for post in account.posts):
            return 403, _problem(403, "Forbidden", "You are not allowed to create a Tweet with duplicate content.")
        number = str(1_860_000_000_000_000_000 + len(account.posts))
        account.posts.append({"id": number, "text": text})
        return 201, {"data": {"id": number, "text": text, "edit_history_tweet_ids": [number]}}


def _problem(status: int, title: str, detail: str) -> dict[str, Any]:
    return {"title": title, "detail": detail, "type": "about:blank", "status": status}
