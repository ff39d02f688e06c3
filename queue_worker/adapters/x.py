"""X (Twitter): post the item as a post through API v2, never twice.

X has no idempotency key, so a request that may have reached X is never sent again on its own:
an attempt that got no answer after sending ends the job ``DELIVERY_OUTCOME_UNKNOWN``, and a
person checks the account before redriving it.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl
from pydantic.alias_generators import to_camel

from wordclaw_mcp import http, ratelimit, redaction
from wordclaw_mcp.adapters import (
    DeliveryResult,
    DeliveryTarget,
    ResendSafety,
)

from .social import SocialAdapter, unsent

POST_URL = "https://x.com/i/web/status/{id}"
OUTCOME_UNKNOWN = (
    "DELIVERY_OUTCOME_UNKNOWN: the request may have reached X, but no answer came ({reason}). X has no "
    "idempotency key, so it is not sent again on its own: check the account for the post, and redrive "
    "the job (retry_plan) only if it is not there."
)


class XConfig(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    base_url: HttpUrl = Field(HttpUrl("https://api.x.com"), description="The API's base URL.")


class XSecrets(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    access_token: str = Field(min_length=1, description="An OAuth 2.0 user-context token with tweet.write.")


class XAdapter(SocialAdapter):
    channel_type = "x"
    config_model = XConfig
    secrets_model = XSecrets
    secrets_required = True
    counting = "x"
    # X has no idempotency key, and nothing to look a post up by before it has an id.
    resend = ResendSafety("none")

    async def deliver(
        self, payload: dict[str, Any], target: DeliveryTarget, *, message_id: str | None = None
    ) -> DeliveryResult:
        config = XConfig.model_validate(target.config)
        token = target.secrets["accessToken"]
        url = str(config.base_url).rstrip("/") + "/2/tweets"
        started = time.monotonic()
        try:
            answer = await self.send(
                "POST",
                url,
                target=target,
                headers={"authorization": f"Bearer {token}"},
                json={"text": payload["text"]},
                timeout=self.options.timeout,
            )
        except (http.TargetRefused, http.ConnectError) as exc:
            return unsent(exc)
        except http.HttpError as exc:
            return DeliveryResult(succeeded=False, retryable=False, error=OUTCOME_UNKNOWN.format(reason=exc))
        return _outcome(answer, token, elapsed_ms=round((time.monotonic() - started) * 1000))


def _outcome(answer: http.Answer, token: str, *, elapsed_ms: int) -> DeliveryResult:
    meta: dict[str, Any] = {
        "elapsedMs": elapsed_ms,
        "rateLimit": {
            name: answer.headers[f"x-rate-limit-{name}"]
            for name in ("limit", "remaining", "reset")
            if f"x-rate-limit-{name}" in answer.headers
        },
    }
    throttled, until = ratelimit.throttle(answer.status, answer.headers)
    body = answer.json_or_none()
    data = body.get("data") if isinstance(body, dict) else None
    if 200 <= answer.status < 300 and isinstance(data, dict) and data.get("id"):
        meta["postId"] = str(data["id"])
        return DeliveryResult(
            succeeded=True,
            status_code=answer.status,
            external_url=POST_URL.format(id=data["id"]),
            raw_meta=meta,
            throttled=throttled,
            throttled_until=until,
        )
    said = (body.get("detail") or body.get("title")) if isinstance(body, dict) else None
    error = f"X answered HTTP {answer.status}: {said or answer.reason or 'no error given'}"
    if answer.status in {401, 403} and "duplicate" not in (said or "").lower():
        error += " Check the target's accessToken (it needs tweet.write) and register it again."
    if 200 <= answer.status < 300:
        # A success without a post id: whether a post was made is not known, and X has no key.
        error = OUTCOME_UNKNOWN.format(reason=f"HTTP {answer.status} without a post id")
    elif answer.status >= 500:
        # X documents its 5xx as trouble inside its own stack (500 "something is broken", 503
        # "overloaded", 504 "the request couldn't be serviced due to some failure within the
        # internal stack"), never as "nothing was posted": a gateway's 504, say, can come while
        # the post is being made behind it. With no idempotency key, a resend could post twice.
        error = OUTCOME_UNKNOWN.format(reason=f"X answered HTTP {answer.status}: {said or answer.reason or 'no body'}")
    return DeliveryResult(
        succeeded=False,
        status_code=answer.status,
        error=redaction.scrub(error, [token]),
        # A 429 is a throttle, tried again after it; anything else is final.
        retryable=answer.status == 429,
        retry_after=ratelimit.retry_after(answer.headers.get("retry-after")),
        raw_meta={**meta, "responseBody": redaction.scrub(answer.text, [token])},
        throttled=throttled and answer.status == 429,
        throttled_until=until if answer.status == 429 else None,
        # A 4xx is X refusing the request (a throttle, a duplicate, a bad token): nothing was posted.
        refused=400 <= answer.status < 500,
    )
