"""Mastodon: post the item as a status, once, however many times the job is tried."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl
from pydantic.alias_generators import to_camel

from wordclaw_mcp import http, ratelimit, redaction
from wordclaw_mcp.adapters import (
    DeliveryResult,
    DeliveryTarget,
    ResendSafety,
)

from .social import SocialAdapter, unsent

DEFAULT_MAX_CHARACTERS = 500  # Mastodon's default; an instance may allow more


class MastodonConfig(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    base_url: HttpUrl = Field(description="The instance, e.g. https://mastodon.social.")
    visibility: Literal["public", "unlisted", "private", "direct"] = "public"
    max_characters: int = Field(
        DEFAULT_MAX_CHARACTERS, ge=1, le=100_000, description="The instance's status limit (500 unless it says more)."
    )


class MastodonSecrets(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    access_token: str = Field(min_length=1, description="An access token with the write:statuses scope.")


class MastodonAdapter(SocialAdapter):
    channel_type = "mastodon"
    config_model = MastodonConfig
    secrets_model = MastodonSecrets
    secrets_required = True
    # mastodon.social allows 300 requests per 5 minutes per account; leave room for the rest.
    default_rate_per_minute = 30.0
    counting = "mastodon"
    text_field = "status"
    # Mastodon answers a repeated Idempotency-Key with the status it made, but keeps the key for an
    # hour only (a Redis setex of 3,600 s in its PostStatusService).
    resend = ResendSafety("idempotency_key", key_lifetime=3600.0)

    def channel_limit(self, config: dict[str, Any]) -> int:
        return int(config.get("maxCharacters") or DEFAULT_MAX_CHARACTERS)

    async def deliver(
        self, payload: dict[str, Any], target: DeliveryTarget, *, message_id: str | None = None
    ) -> DeliveryResult:
        config = MastodonConfig.model_validate(target.config)
        token = target.secrets["accessToken"]
        url = str(config.base_url).rstrip("/") + "/api/v1/statuses"
        headers = {"authorization": f"Bearer {token}"}
        if message_id:
            # The job id, the same on every attempt: Mastodon answers a repeated key with the
            # status it already made, so a retry after a lost answer cannot post twice.
            headers["idempotency-key"] = message_id
        started = time.monotonic()
        try:
            answer = await self.send(
                "POST",
                url,
                target=target,
                headers=headers,
                json={**payload, "visibility": config.visibility},
                timeout=self.options.timeout,
            )
        except (http.TargetRefused, http.ConnectError) as exc:
            return unsent(exc)
        except http.HttpError as exc:
            # Safe to retry even if it was sent: the idempotency key makes the repeat a no-op.
            return DeliveryResult(succeeded=False, retryable=True, error=f"{type(exc).__name__}: {exc}")
        return _outcome(answer, token, elapsed_ms=round((time.monotonic() - started) * 1000))


def _outcome(answer: http.Answer, token: str, *, elapsed_ms: int) -> DeliveryResult:
    meta: dict[str, Any] = {
        "elapsedMs": elapsed_ms,
        "rateLimit": {
            name: answer.headers[f"x-ratelimit-{name}"]
            for name in ("limit", "remaining", "reset")
            if f"x-ratelimit-{name}" in answer.headers
        },
    }
    throttled, until = ratelimit.throttle(answer.status, answer.headers)
    body = answer.json_or_none()
    if 200 <= answer.status < 300 and isinstance(body, dict) and body.get("url"):
        meta["statusId"] = body.get("id")
        return DeliveryResult(
            succeeded=True,
            status_code=answer.status,
            external_url=str(body["url"]),
            raw_meta=meta,
            throttled=throttled,
            throttled_until=until,
        )
    said = body.get("error") if isinstance(body, dict) else None
    error = f"Mastodon answered HTTP {answer.status}: {said or answer.reason or 'no error given'}"
    if answer.status in {401, 403}:
        error += " Check the target's accessToken (it needs the write:statuses scope) and register it again."
    return DeliveryResult(
        succeeded=False,
        status_code=answer.status,
        error=redaction.scrub(error, [token]),
        retryable=answer.status >= 500 or answer.status in {408, 429} or 200 <= answer.status < 300,
        retry_after=ratelimit.retry_after(answer.headers.get("retry-after")),
        raw_meta={**meta, "responseBody": redaction.scrub(answer.text, [token])},
        throttled=throttled,
        throttled_until=until,
        # A 4xx is Mastodon refusing the request (Rack::Attack throttles before the controller,
        # and validation fails before a status is made); a 5xx may come after the status was made.
        refused=400 <= answer.status < 500,
    )
