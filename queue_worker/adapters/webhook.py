"""Webhook: POST the payload as JSON, signed per Standard Webhooks when a secret is set."""

from __future__ import annotations

import base64
import json
import ssl
import time
import uuid
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator
from pydantic.alias_generators import to_camel
from standardwebhooks import Webhook

from wordclaw_mcp import netguard
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import ContentItem, TransformPolicy

from .base import Adapter, DeliveryResult, DeliveryTarget, render_content

USER_AGENT = "WordClaw-Distribution/0.1 (+webhook)"
RESPONSE_BODY_LIMIT = 2048
# Throttling and server-side trouble pass; other 4xx and 3xx need someone to change something.
RETRYABLE_STATUSES = frozenset({408, 425, 429})


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="http or https endpoint that receives the POST.")


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

    _client: httpx.AsyncClient | None = None

    async def check_target(self, config: BaseModel) -> None:
        assert isinstance(config, WebhookConfig)
        await netguard.check_url(str(config.url), allow_private=self.options.allow_private_targets)

    def transform(self, content: ContentItem, policy: TransformPolicy) -> dict[str, Any]:
        return {"type": "content.distributed", "data": render_content(content, policy)}

    async def deliver(
        self, payload: dict[str, Any], target: DeliveryTarget, *, message_id: str | None = None
    ) -> DeliveryResult:
        message_id = message_id or f"msg_{uuid.uuid4().hex}"
        url = str(target.config["url"])
        try:
            addresses = await netguard.check_url(
                url, allow_private=self.options.allow_private_targets, must_resolve=True
            )
        except DistributionError as exc:
            return DeliveryResult(
                succeeded=False,
                error=f"{exc.code}: {exc.message}",
                retryable=exc.code == "TARGET_UNRESOLVABLE",
            )
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        sent_at = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": message_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
        }
        if signing_secret := target.secrets.get("signingSecret"):
            headers["webhook-signature"] = Webhook(signing_secret).sign(message_id, sent_at, body)

        started = time.monotonic()
        try:
            response = await self._post(addresses, body.encode(), headers)
        except httpx.TimeoutException:
            return DeliveryResult(
                succeeded=False,
                retryable=True,
                error=f"The endpoint did not answer within {self.options.timeout:g} s.",
            )
        except httpx.HTTPError as exc:
            return DeliveryResult(succeeded=False, retryable=True, error=f"{type(exc).__name__}: {exc}")
        return _outcome(response, url, elapsed_ms=round((time.monotonic() - started) * 1000))

    async def _post(self, addresses: list[netguard.PinnedURL], body: bytes, headers: dict[str, str]) -> httpx.Response:
        """POST to the first checked address that accepts a connection."""
        for index, pinned in enumerate(addresses):
            try:
                return await self._http().post(
                    pinned.url,
                    content=body,
                    headers={**headers, "host": pinned.host_header},
                    extensions={"sni_hostname": pinned.sni_hostname},
                )
            except httpx.ConnectError:
                if index == len(addresses) - 1:
                    raise
        raise AssertionError("check_url(must_resolve=True) returns at least one address")

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # No redirects (a 3xx is a failure, and following one would skip the address check);
            # trust_env=False so an ambient proxy cannot undo the pinning.
            verify = ssl.create_default_context(cafile=self.options.ca_bundle) if self.options.ca_bundle else True
            self._client = httpx.AsyncClient(
                timeout=self.options.timeout, follow_redirects=False, trust_env=False, verify=verify
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _outcome(response: httpx.Response, url: str, *, elapsed_ms: int) -> DeliveryResult:
    status = response.status_code
    raw_meta: dict[str, Any] = {
        "elapsedMs": elapsed_ms,
        "responseHeaders": {
            name: response.headers[name]
            for name in ("content-type", "location", "retry-after", "x-request-id")
            if name in response.headers
        },
        "responseBody": response.text[:RESPONSE_BODY_LIMIT],
    }
    external_url = response.headers.get("location") or _public_url(url)
    if 200 <= status < 300:
        return DeliveryResult(succeeded=True, status_code=status, external_url=external_url, raw_meta=raw_meta)
    return DeliveryResult(
        succeeded=False,
        status_code=status,
        external_url=external_url,
        error=f"The endpoint answered HTTP {status} {response.reason_phrase}".rstrip() + ".",
        retryable=status >= 500 or status in RETRYABLE_STATUSES,
        retry_after=_retry_after(response.headers.get("retry-after")),
        raw_meta=raw_meta,
    )


def _public_url(url: str) -> str:
    """The endpoint without credentials or query, which may carry tokens."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)
