"""Webhook: POST the payload as JSON, signed per Standard Webhooks when a secret is set."""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator
from pydantic.alias_generators import to_camel
from standardwebhooks import Webhook

from wordclaw_mcp import http, netguard, ratelimit, redaction
from wordclaw_mcp.adapters import (
    Adapter,
    DeliveryResult,
    DeliveryTarget,
    ResendSafety,
    SealedConfig,
    render_content,
)
from wordclaw_mcp.models import ContentItem, TransformPolicy

USER_AGENT = "WordClaw-Distribution/0.1 (+webhook)"
RESPONSE_BODY_LIMIT = http.DEFAULT_BODY_LIMIT
# Throttling and server-side trouble pass; other 4xx and 3xx need someone to change something.
RETRYABLE_STATUSES = frozenset({408, 425, 429})
# The prefix of the keys under which seal_config keeps the values of a target's extra headers.
HEADER_SECRET = "header:"
# The key in a target's secrets under which seal_config keeps a URL that carries credentials.
URL_SECRET = "url"


# Headers a target may not set: the delivery's own, and what the HTTP layer decides.
RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "host",
        "user-agent",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "transfer-encoding",
        "connection",
    }
)
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    url: HttpUrl = Field(description="http or https endpoint that receives the POST.")
    headers: dict[str, str] = Field(
        default_factory=dict, max_length=20, description="Extra request headers, e.g. an API key the endpoint wants."
    )
    timeout_seconds: float | None = Field(
        None, gt=0, le=120, description="The whole delivery's deadline; default WORDCLAW_DELIVERY_TIMEOUT."
    )

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"{name!r} is set by WordClaw and cannot be overridden")
            if any(c in value for c in "\r\n\x00") or len(value) > 8000:
                raise ValueError(f"the value of {name!r} holds a line break or is too long")
        return headers

    @field_validator("url")
    @classmethod
    def _no_user_info(cls, value: HttpUrl) -> HttpUrl:
        if value.username or value.password:
            # Neither is echoed. They would be stored in clear, and deliveries never send them.
            raise ValueError(
                "must not contain a user name or password; put a token the endpoint accepts in the "
                "query string instead (it is stored encrypted), or sign deliveries with secrets.signingSecret"
            )
        return value


class WebhookSecrets(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    signing_secret: str = Field(description="whsec_ followed by base64 of 24 to 64 random bytes.")

    @field_validator("signing_secret")
    @classmethod
    def _standard_webhooks_secret(cls, value: str) -> str:
        try:
            key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
        except ValueError:
            key = b""
        if not value.startswith("whsec_") or not 24 <= len(key) <= 64:
            # The value itself is never echoed: it is a secret.
            raise ValueError("must be 'whsec_' followed by base64 of 24 to 64 random bytes")
        return value


class WebhookAdapter(Adapter):
    channel_type = "webhook"
    config_model = WebhookConfig
    secrets_model = WebhookSecrets
    # Every attempt of a job carries the job id as webhook-id, which Standard Webhooks receivers
    # keep to deduplicate redeliveries.
    resend = ResendSafety("idempotency_key")

    async def check_target(self, config: BaseModel) -> None:
        assert isinstance(config, WebhookConfig)
        await netguard.check_url(str(config.url), allow_private=self.options.allow_private_targets)

    def generate_secrets(self, given: Mapping[str, str]) -> dict[str, str]:
        # Every delivery is signed: a target registered without a secret gets one, shown once.
        return {} if given.get("signingSecret") else {"signingSecret": new_signing_secret()}

    def rotate_secrets(
        self, current: Mapping[str, str], previous_valid_until: datetime | None
    ) -> tuple[dict[str, str], dict[str, str]]:
        new = new_signing_secret()
        stored = {key: value for key, value in current.items() if not key.startswith("previous")}
        stored["signingSecret"] = new
        if previous_valid_until and (old := current.get("signingSecret")):
            stored |= {"previousSigningSecret": old, "previousValidUntil": previous_valid_until.isoformat()}
        return stored, {"signingSecret": new}

    def seal_config(self, config: dict[str, Any]) -> SealedConfig:
        """A URL with a query or a channel token is kept whole in the secrets and shown redacted,
        and so is every extra header's value (an API key, as often as not)."""
        url = str(config["url"])
        shown = redaction.redact_url(url)
        sealed: dict[str, str] = {} if shown == url else {URL_SECRET: url}
        headers = config.get("headers") or {}
        sealed |= {HEADER_SECRET + name: value for name, value in headers.items() if value != redaction.REDACTED}
        return SealedConfig(
            {**config, "url": shown, **({"headers": dict.fromkeys(headers, redaction.REDACTED)} if headers else {})},
            sealed,
        )

    def transform(self, content: ContentItem, policy: TransformPolicy) -> dict[str, Any]:
        return {"type": "content.distributed", "data": render_content(content, policy)}

    async def deliver(
        self, payload: dict[str, Any], target: DeliveryTarget, *, message_id: str | None = None
    ) -> DeliveryResult:
        message_id = message_id or f"msg_{uuid.uuid4().hex}"
        # Targets registered before URLs were sealed keep the whole URL in their config.
        url = target.secrets.get(URL_SECRET) or str(target.config["url"])
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        sent_at = datetime.now(UTC)
        timeout = float(target.config.get("timeoutSeconds") or self.options.timeout)
        headers = {
            name: target.secrets.get(HEADER_SECRET + name, value)
            for name, value in (target.config.get("headers") or {}).items()
        } | {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": message_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
        }
        if signatures := _signatures(target.secrets, message_id, sent_at, body):
            headers["webhook-signature"] = signatures

        started = time.monotonic()
        try:
            # The address is checked as the connection opens (wordclaw_mcp/http.py).
            answer = await self.send(
                "POST",
                url,
                target=target,
                headers=headers,
                body=body.encode(),
                timeout=timeout,
                max_body=RESPONSE_BODY_LIMIT,
            )
        except http.TargetRefused as exc:
            return DeliveryResult(
                succeeded=False,
                error=f"{exc.code}: {exc.message}",
                retryable=exc.code == "TARGET_UNRESOLVABLE",
            )
        except http.ConnectError as exc:
            return DeliveryResult(succeeded=False, retryable=True, error=f"ConnectError: {exc}")
        except http.DeadlineExceeded:
            return DeliveryResult(
                succeeded=False,
                retryable=True,
                error=f"The endpoint did not answer within {timeout:g} s.",
            )
        except http.HttpError as exc:
            return DeliveryResult(succeeded=False, retryable=True, error=f"{type(exc).__name__}: {exc}")
        return _outcome(answer, url, elapsed_ms=round((time.monotonic() - started) * 1000))


def new_signing_secret() -> str:
    """A Standard Webhooks secret: whsec_ and base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _signatures(target_secrets: Mapping[str, str], message_id: str, sent_at: datetime, body: str) -> str | None:
    """The webhook-signature header: the current secret's signature and, while a rotation's grace
    lasts, the previous secret's too (space-separated, as Standard Webhooks allows)."""
    keys = [target_secrets.get("signingSecret")]
    until = target_secrets.get("previousValidUntil")
    if until and datetime.fromisoformat(until) > sent_at:
        keys.append(target_secrets.get("previousSigningSecret"))
    signed = [Webhook(key).sign(message_id, sent_at, body) for key in keys if key]
    return " ".join(signed) or None


def _outcome(answer: http.Answer, url: str, *, elapsed_ms: int) -> DeliveryResult:
    status = answer.status
    raw_meta: dict[str, Any] = {
        "elapsedMs": elapsed_ms,
        "responseHeaders": {
            name: answer.headers[name]
            for name in (
                "content-type",
                "location",
                "retry-after",
                "x-request-id",
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
            )
            if name in answer.headers
        },
        "responseBody": answer.text,
    }
    external_url = answer.headers.get("location") or redaction.public_url(url)
    throttled, throttled_until = ratelimit.throttle(status, answer.headers)
    if 200 <= status < 300:
        return DeliveryResult(
            succeeded=True,
            status_code=status,
            external_url=external_url,
            raw_meta=raw_meta,
            throttled=throttled,
            throttled_until=throttled_until,
        )
    return DeliveryResult(
        succeeded=False,
        status_code=status,
        external_url=external_url,
        error=f"The endpoint answered HTTP {status} {answer.reason}".rstrip() + ".",
        retryable=status >= 500 or status in RETRYABLE_STATUSES,
        retry_after=ratelimit.retry_after(answer.headers.get("retry-after")),
        raw_meta=raw_meta,
        throttled=throttled,
        throttled_until=throttled_until,
        target_gone=status == 410,
    )
