"""X's API v2 post endpoint on 127.0.0.1, as faithful as the tests need.

``POST /2/tweets`` with ``Authorization: Bearer`` and JSON ``{"text"}``: 201 ``{"data": {"id",
"text", "edit_history_tweet_ids"}}``; 401 and 403 with X's problem bodies (``title``, ``detail``,
``type``, ``status``), 403 for a duplicate of an earlier post; 400 for a text over 280 (ASCII
counted plainly, URLs as 23: the tests' texts are ASCII); every answer carries
``x-rate-limit-limit``, ``-remaining`` and ``-reset`` (Unix seconds), and a spent budget answers
429. ``hang`` makes the post and then never answers, as a lost answer looks to the client;
``answer_after`` makes the post and answers that many seconds later (a slow API, during which a
worker can die with the post made); ``error_after_posting`` makes the post and answers with that
5xx, as a gateway that timed out in front of a backend that went on does (X's response-code
documentation: 504 "the request couldn't be serviced due to some failure within the internal
stack").
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from typing import Any

from tests.fake_api import FakeJsonApi, Reply

URL = re.compile(r"https?://\S+")


@dataclass
class Account:
    token: str = "x-token"
    remaining: int = 100
    reset_in: float = 900.0
    hang: bool = False
    answer_after: float = 0.0
    error_after_posting: int | None = None
    posts: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    # The text of every post asked for, duplicates and refusals included.
    asked: list[str] = field(default_factory=list)


class FakeX(FakeJsonApi):
    content_type = "application/json; charset=utf-8"

    def __init__(self) -> None:
        super().__init__()
        self.account = Account()

    def post(self, path: str, headers: Message, raw: bytes) -> Reply:
        status, body = self._post(path, headers.get("authorization"), raw)
        account = self.account
        rate = {
            "x-rate-limit-limit": "100",
            "x-rate-limit-remaining": str(max(account.remaining, 0)),
            "x-rate-limit-reset": str(int(time.time() + account.reset_in)),
        }
        posted = status == 201
        if posted and account.error_after_posting:
            status = account.error_after_posting
            body = _problem(status, HTTPStatus(status).phrase, HTTPStatus(status).description)
        return Reply(status, body, rate, hang=account.hang and posted, delay=account.answer_after if posted else 0.0)

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
        account.asked.append(text)
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
