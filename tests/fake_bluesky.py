"""A Bluesky PDS's XRPC endpoints on 127.0.0.1, as faithful as the tests need.

``com.atproto.server.createSession`` (identifier and app password, else 401
``AuthenticationRequired``), ``refreshSession`` (the refresh JWT), and
``com.atproto.repo.createRecord`` for ``app.bsky.feed.post``: Bearer access JWT (an expired
one answers 400 ``ExpiredToken``), the record checked as a PDS would (its ``$type``, at most
300 graphemes and 3,000 bytes, each link facet's UTF-8 byte range covering its URI), and
``ratelimit-*`` headers with 429 once the budget is spent. Errors are ``{"error", "message"}``. On
demand it refuses posts with an error that quotes the Authorization header
(``refuse_quoting_authorization``).

A record key already used answers **HTTP 500 ``{"error": "InternalServerError", "message":
"Internal Server Error"}``**, as the reference PDS does: its repo transactor hits the records
table's unique key and the XRPC server turns the unhandled database error into a bare 500
(bluesky-social/atproto issue 3718; indigo issue 873 reports the same of the Go PDS). Whether a
record exists is what ``GET com.atproto.repo.getRecord?repo&collection&rkey`` is for: 200 with
``{uri, cid, value}``, or 400 ``RecordNotFound`` "Could not locate record: <uri>" (the PDS's
getRecord handler). It needs no session.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from urllib.parse import parse_qs, urlsplit

import regex

from tests.fake_api import FakeJsonApi, Reply

DID = "did:plc:wordclawtest000000000000"


@dataclass
class Account:
    identifier: str = "wordclaw.bsky.social"
    app_password: str = "abcd-efgh-ijkl-mnop"
    remaining: int = 100
    sessions: int = 0
    refreshes: int = 0
    valid_access: set[str] = field(default_factory=set)
    expired_access: set[str] = field(default_factory=set)
    valid_refresh: set[str] = field(default_factory=set)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    drop_answers: int = 0
    creates: int = 0
    reads: int = 0
    # Refuse every post with a 400 that quotes the request's Authorization header, as the PDS in
    # issue 15 did: an error that carries the session's access token back.
    refuse_quoting_authorization: bool = False
    issued: list[str] = field(default_factory=list)  # every token handed out, for tests to look for

    def expire_sessions(self) -> None:
        self.expired_access |= self.valid_access
        self.valid_access.clear()


class FakeBluesky(FakeJsonApi):
    def __init__(self) -> None:
        super().__init__()
        self.account = Account()

    def post(self, path: str, headers: Message, raw: bytes) -> Reply:
        bearer = (headers.get("authorization") or "").removeprefix("Bearer ")
        status, body, drop = self._post(path, bearer, json.loads(raw or b"{}"))
        rate = {
            "ratelimit-limit": "100",
            "ratelimit-remaining": str(max(self.account.remaining, 0)),
            "ratelimit-reset": str(int(time.time()) + 300),
        }
        return Reply(status, body, rate, drop=drop)

    def _tokens(self) -> dict[str, Any]:
        account = self.account
        account.sessions += 1
        access, refresh = f"access-{account.sessions}-{time.time_ns()}", f"refresh-{account.sessions}-{time.time_ns()}"
        account.valid_access.add(access)
        account.valid_refresh.add(refresh)
        account.issued += [access, refresh]
        return {"accessJwt": access, "refreshJwt": refresh, "did": DID, "handle": account.identifier, "active": True}

    def _post(self, path: str, bearer: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
        account = self.account
        if path == "/xrpc/com.atproto.server.createSession":
            if (body.get("identifier"), body.get("password")) != (account.identifier, account.app_password):
                return 401, _error("AuthenticationRequired", "Invalid identifier or password"), False
            return 200, self._tokens(), False
        if path == "/xrpc/com.atproto.server.refreshSession":
            if bearer not in account.valid_refresh:
                return 400, _error("ExpiredToken", "Token has expired"), False
            account.valid_refresh.discard(bearer)
            account.refreshes += 1
            return 200, self._tokens(), False
        if path != "/xrpc/com.atproto.repo.createRecord":
            return 404, _error("MethodNotImplemented", "Method Not Implemented"), False
        if bearer in account.expired_access:
            return 400, _error("ExpiredToken", "Token has expired"), False
        if bearer not in account.valid_access:
            return 401, _error("AuthenticationRequired", "Invalid token"), False
        if account.remaining <= 0:
            return 429, _error("RateLimitExceeded", "Rate Limit Exceeded"), False
        account.remaining -= 1
        account.creates += 1
        if account.refuse_quoting_authorization:
            return 400, _error("InvalidRequest", f"Request refused (authorization: Bearer {bearer})"), False
        record = body.get("record") or {}
        problem = _invalid(body, record)
        if problem:
            return 400, _error("InvalidRequest", problem), False
        rkey = body["rkey"]
        if rkey in account.records:
            return 500, _error("InternalServerError", "Internal Server Error"), False
        account.records[rkey] = record
        answer = {"uri": f"at://{DID}/app.bsky.feed.post/{rkey}", "cid": "bafyreib2rxk3rybloqtqwbo"}
        if account.drop_answers > 0:
            account.drop_answers -= 1
            return 0, {}, True
        return 200, answer, False


    def get(self, path: str, headers: Message) -> Reply:
        url = urlsplit(path)
        if url.path != "/xrpc/com.atproto.repo.getRecord":
            return Reply(404, _error("MethodNotImplemented", "Method Not Implemented"))
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        if not query.get("repo") or not query.get("collection") or not query.get("rkey"):
            return Reply(400, _error("InvalidRequest", "Error: Params must have the properties repo, collection, rkey"))
        uri = f"at://{query['repo']}/{query['collection']}/{query['rkey']}"
        self.account.reads += 1
        record = self.account.records.get(query["rkey"])
        if query["repo"] != DID or query["collection"] != "app.bsky.feed.post" or record is None:
            return Reply(400, _error("RecordNotFound", f"Could not locate record: {uri}"))
        return Reply(200, {"uri": uri, "cid": "bafyreib2rxk3rybloqtqwbo", "value": record})


def _invalid(body: dict[str, Any], record: dict[str, Any]) -> str | None:
    if body.get("repo") != DID or body.get("collection") != "app.bsky.feed.post" or not body.get("rkey"):
        return "Input must have the properties repo, collection and rkey"
    if record.get("$type") != "app.bsky.feed.post" or not record.get("createdAt"):
        return "Invalid app.bsky.feed.post record"
    post = str(record.get("text") or "")
    if len(regex.findall(r"\X", post)) > 300 or len(post.encode()) > 3000:
        return "Record/text must not be longer than 300 graphemes"
    data = post.encode()
    for facet in record.get("facets") or []:
        index, [feature] = facet["index"], facet["features"]
        if data[index["byteStart"] : index["byteEnd"]].decode(errors="replace") != feature["uri"]:
            return "Invalid facet: its byte range does not hold its link"
    return None


def _error(name: str, message: str) -> dict[str, str]:
    return {"error": name, "message": message}
