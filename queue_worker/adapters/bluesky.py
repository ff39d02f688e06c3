"""Bluesky (AT Protocol): post the item to a PDS, logging in once and reusing the session.

Each job writes its post under a record key derived from the job id, so a retry after a lost
answer names the post it may already have made. The reference PDS answers a second
``createRecord`` with a key already used with a bare HTTP 500 (bluesky-social/atproto issue
3718), not an "already exists" error, so the adapter reads the record back
(``com.atproto.repo.getRecord``) before posting a job that may have posted, and after any 5xx: if
it is there, the job succeeded with its URL.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, HttpUrl
from pydantic.alias_generators import to_camel

from wordclaw_mcp import http, ratelimit, redaction, text
from wordclaw_mcp.adapters import (
    DeliveryResult,
    DeliveryTarget,
    ResendSafety,
    current_attempt,
    declare_secrets,
)
from wordclaw_mcp.models import ContentItem, TransformPolicy

from .social import SocialAdapter

POST_COLLECTION = "app.bsky.feed.post"
WEB_POST = "https://bsky.app/profile/{did}/post/{rkey}"
_TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"  # base32-sortable, as TIDs are written


class BlueskyConfig(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    base_url: HttpUrl = Field(HttpUrl("https://bsky.social"), description="The account's PDS.")
    identifier: str = Field(min_length=1, max_length=253, description="The handle or DID to log in as.")


class BlueskySecrets(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    app_password: str = Field(min_length=1, description="An app password (Settings > App passwords).")


class BlueskyError(Exception):
    def __init__(self, result: DeliveryResult) -> None:
        self.result = result


def record_key(message_id: str) -> str:
    """A TID-shaped record key (13 characters, base32-sortable) that is the same for every attempt of a job."""
    number = int.from_bytes(hashlib.sha256(message_id.encode()).digest()[:8], "big") >> 1  # 63 bits, top bit clear
    return "".join(_TID_ALPHABET[(number >> shift) & 31] for shift in range(60, -1, -5))


class BlueskyAdapter(SocialAdapter):
    channel_type = "bluesky"
    config_model = BlueskyConfig
    secrets_model = BlueskySecrets
    secrets_required = True
    counting = "bluesky"
    # Each job posts under its own record key, which the adapter reads back before posting again.
    resend = ResendSafety("collision_check")

    def transform(self, content: ContentItem, policy: TransformPolicy) -> dict[str, Any]:
        post = self.fit(content, policy).text
        return {"text": post, "facets": text.link_facets(post)}

    async def deliver(
        self, payload: dict[str, Any], target: DeliveryTarget, *, message_id: str | None = None
    ) -> DeliveryResult:
        config = BlueskyConfig.model_validate(target.config)
        password = target.secrets["appPassword"]
        base = str(config.base_url).rstrip("/")
        rkey = record_key(message_id or str(time.time_ns()))
        started = time.monotonic()
        # Credentials as much as the app password: a PDS's error may quote the Authorization header.
        used = [password]
        try:
            session = await self._session(target, base, config.identifier, password)
            _use(session, used)
            posted_before = current_attempt.get().may_have_posted_before
            if posted_before and (found := await self._posted(target, base, session, rkey, used)):
                return found
            answer = await self._create(target, base, session, rkey, payload)
            if _error(answer) == "ExpiredToken":
                session = await self._refresh(target, base, session, config.identifier, password)
                _use(session, used)
                answer = await self._create(target, base, session, rkey, payload)
            # A 5xx may be the PDS refusing a key already used (or failing after the write); some
            # servers say "already exists" instead. Either way the record decides.
            if (answer.status >= 500 or _already_exists(answer)) and (
                found := await self._posted(target, base, session, rkey, used)
            ):
                return found
        except BlueskyError as exc:
            return exc.result
        except http.HttpError as exc:
            # Safe to retry even if it was sent: the record key makes the repeat collide.
            retryable = not isinstance(exc, http.TargetRefused) or exc.code == "TARGET_UNRESOLVABLE"
            error = redaction.scrub(f"{type(exc).__name__}: {exc}", used)
            return DeliveryResult(succeeded=False, retryable=retryable, error=error)
        elapsed = round((time.monotonic() - started) * 1000)
        return _outcome(answer, session["did"], rkey, used, elapsed_ms=elapsed)

    async def _session(self, target: DeliveryTarget, base: str, identifier: str, password: str) -> dict[str, str]:
        if self.store is not None and (kept := await self.store.session(target.id)):
            return kept
        return await self._login(target, base, identifier, password)

    async def _login(self, target: DeliveryTarget, base: str, identifier: str, password: str) -> dict[str, str]:
        # Through the target's client, as the post is: the login goes to the same PDS.
        answer = await self.http_for(target).request(
            "POST",
            f"{base}/xrpc/com.atproto.server.createSession",
            json={"identifier": identifier, "password": password},
            timeout=self.options.timeout,
        )
        body = answer.json_or_none()
        if answer.status != 200 or not isinstance(body, dict) or not body.get("accessJwt"):
            raise BlueskyError(_failure(answer, [password], "Logging in failed"))
        session = {key: str(body[key]) for key in ("accessJwt", "refreshJwt", "did")}
        if self.store is not None:
            await self.store.put_session(target.id, session)
        return session

    async def _refresh(
        self, target: DeliveryTarget, base: str, session: dict[str, str], identifier: str, password: str
    ) -> dict[str, str]:
        answer = await self.http_for(target).request(
            "POST",
            f"{base}/xrpc/com.atproto.server.refreshSession",
            headers={"authorization": f"Bearer {session['refreshJwt']}"},
            timeout=self.options.timeout,
        )
        body = answer.json_or_none()
        if answer.status != 200 or not isinstance(body, dict) or not body.get("accessJwt"):
            return await self._login(target, base, identifier, password)  # the refresh token ran out too
        fresh = {key: str(body[key]) for key in ("accessJwt", "refreshJwt", "did")}
        if self.store is not None:
            await self.store.put_session(target.id, fresh)
        return fresh

    async def _posted(
        self, target: DeliveryTarget, base: str, session: dict[str, str], rkey: str, secrets: list[str]
    ) -> DeliveryResult | None:
        """The job's post, if a record is already there under its key (an earlier attempt made it).

        None when the PDS says there is none; a PDS that cannot tell raises, so that nothing is
        posted on a guess.
        """
        query = urlencode({"repo": session["did"], "collection": POST_COLLECTION, "rkey": rkey})
        answer = await self.http_for(target).request(
            "GET", f"{base}/xrpc/com.atproto.repo.getRecord?{query}", timeout=self.options.timeout
        )
        if answer.status == 200:
            return DeliveryResult(
                succeeded=True,
                status_code=200,
                external_url=WEB_POST.format(did=session["did"], rkey=rkey),
                raw_meta={"rkey": rkey, "uri": (answer.json_or_none() or {}).get("uri"), "foundExisting": True},
            )
        if answer.status == 400 and _error(answer) == "RecordNotFound":
            return None
        raise BlueskyError(_failure(answer, secrets, "Checking for an earlier post failed"))

    async def _create(
        self, target: DeliveryTarget, base: str, session: dict[str, str], rkey: str, payload: dict[str, Any]
    ) -> http.Answer:
        record = {
            "$type": POST_COLLECTION,
            "text": payload["text"],
            "createdAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        if payload.get("facets"):
            record["facets"] = payload["facets"]
        return await self.send(
            "POST",
            f"{base}/xrpc/com.atproto.repo.createRecord",
            target=target,
            headers={"authorization": f"Bearer {session['accessJwt']}"},
            json={"repo": session["did"], "collection": POST_COLLECTION, "rkey": rkey, "record": record},
            timeout=self.options.timeout,
        )


def _use(session: dict[str, str], used: list[str]) -> None:
    """Scrub the session's tokens from this delivery's result, here and in the worker."""
    tokens = [session["accessJwt"], session["refreshJwt"]]
    used += tokens
    declare_secrets(*tokens)


def _error(answer: http.Answer) -> str | None:
    body = answer.json_or_none()
    return str(body.get("error")) if isinstance(body, dict) and body.get("error") else None


def _outcome(answer: http.Answer, did: str, rkey: str, secrets: list[str], *, elapsed_ms: int) -> DeliveryResult:
    url = WEB_POST.format(did=did, rkey=rkey)
    meta = {"elapsedMs": elapsed_ms, "rkey": rkey}
    if answer.status == 200:
        body = answer.json_or_none() or {}
        return DeliveryResult(
            succeeded=True, status_code=200, external_url=url, raw_meta={**meta, "uri": body.get("uri")}
        )
    return _failure(answer, secrets, "Posting failed")


def _already_exists(answer: http.Answer) -> bool:
    body = answer.json_or_none()
    return answer.status == 400 and isinstance(body, dict) and "already exists" in str(body.get("message")).lower()


def _failure(answer: http.Answer, secrets: list[str], doing: str) -> DeliveryResult:
    body = answer.json_or_none()
    said = f"{body.get('error')}: {body.get('message')}" if isinstance(body, dict) else answer.reason
    error = f"{doing}: Bluesky answered HTTP {answer.status} ({said})."
    if answer.status == 401:
        error += " Check the target's identifier and appPassword, and register it again."
    throttled, until = ratelimit.throttle(answer.status, answer.headers)
    return DeliveryResult(
        succeeded=False,
        status_code=answer.status,
        error=redaction.scrub(error, secrets),
        retryable=answer.status >= 500 or answer.status == 429,
        raw_meta={"responseBody": redaction.scrub(answer.text, secrets)},
        throttled=throttled,
        throttled_until=until,
        refused=400 <= answer.status < 500,
    )
