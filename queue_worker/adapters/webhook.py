"""Webhook: POST the payload as JSON, signed per Standard Webhooks when a secret is set."""

from __future__ import annotations

import base64
import codecs
import json
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator
from pydantic.alias_generators import to_camel
from standardwebhooks import Webhook

from wordclaw_mcp import netguard, redaction
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import ContentItem, TransformPolicy

from . import ratelimit
from .base import (
    Adapter,
    DeliveryResult,
    DeliveryTarget,
    Progress,
    SealedConfig,
    delivery_progress,
    render_content,
)

USER_AGENT = "WordClaw-Distribution/0.1 (+webhook)"
RESPONSE_BODY_LIMIT = 2048
# Throttling and server-side trouble pass; other 4xx and 3xx need someone to change something.
RETRYABLE_STATUSES = frozenset({408, 425, 429})
# The key in a target's secrets under which seal_config keeps a URL that carries credentials.
URL_SECRET = "url"
# Hostnames with a connection pool of their own; the least recently used beyond this are closed.
MAX_HOST_POOLS = 64


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="http or https endpoint that receives the POST.")

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


@dataclass(frozen=True)
class Answer:
    """What the endpoint said, with at most RESPONSE_BODY_LIMIT bytes of its body."""

    status_code: int
    reason_phrase: str
    headers: httpx.Headers
    body: str


@dataclass
class _HostPool:
    client: httpx.AsyncClient
    users: int = 0
    retired: bool = False


class HostPools:
    """One httpx client, and so one connection pool, per hostname.

    httpx reuses a connection for any request to the same scheme, address and port, and the URL
    is pinned to the checked address. TLS checks the certificate against the hostname only when
    a connection opens, so a shared pool would send a request for one name over a connection
    verified for another name on the same address.
    """

    def __init__(self, make_client: Callable[[], httpx.AsyncClient], limit: int = MAX_HOST_POOLS) -> None:
        self._make_client = make_client
        self._limit = limit
        self._pools: OrderedDict[str, _HostPool] = OrderedDict()

    @asynccontextmanager
    async def client(self, hostname: str) -> AsyncIterator[httpx.AsyncClient]:
        key = hostname.lower()
        pool = self._pools.pop(key, None) or _HostPool(self._make_client())
        self._pools[key] = pool  # now the most recently used
        pool.users += 1
        try:
            await self._trim()
            yield pool.client
        finally:
            pool.users -= 1
            if pool.retired and not pool.users:
                await _close(pool.client)

    async def _trim(self) -> None:
        while len(self._pools) > self._limit:
            _key, oldest = self._pools.popitem(last=False)
            oldest.retired = True
            if not oldest.users:  # one still in use is closed by its last user
                await _close(oldest.client)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await _close(pool.client)


async def _close(client: httpx.AsyncClient) -> None:
    with anyio.CancelScope(shield=True):  # even when a cancelled delivery is what lets go of it
        await client.aclose()


class WebhookAdapter(Adapter):
    channel_type = "webhook"
    config_model = WebhookConfig
    secrets_model = WebhookSecrets

    _pools: HostPools | None = None

    async def check_target(self, config: BaseModel) -> None:
        assert isinstance(config, WebhookConfig)
        await netguard.check_url(str(config.url), allow_private=self.options.allow_private_targets)

    def seal_config(self, config: dict[str, Any]) -> SealedConfig:
        """A URL with a query or a channel token is kept whole in the secrets and shown redacted."""
        url = str(config["url"])
        shown = redaction.redact_url(url)
        if shown == url:
            return SealedConfig(config)
        return SealedConfig({**config, "url": shown}, {URL_SECRET: url})

    def transform(self, content: ContentItem, policy: TransformPolicy) -> dict[str, Any]:
        return {"type": "content.distributed", "data": render_content(content, policy)}

    async def deliver(
        self, payload: dict[str, Any], target: DeliveryTarget, *, message_id: str | None = None
    ) -> DeliveryResult:
        message_id = message_id or f"msg_{uuid.uuid4().hex}"
        # Targets registered before URLs were sealed keep the whole URL in their config.
        url = target.secrets.get(URL_SECRET) or str(target.config["url"])
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
            # Only raw bytes are read, up to the limit: a compressed body could not be bounded.
            "accept-encoding": "identity",
        }
        if signing_secret := target.secrets.get("signingSecret"):
            headers["webhook-signature"] = Webhook(signing_secret).sign(message_id, sent_at, body)

        started = time.monotonic()
        timed_out = DeliveryResult(
            succeeded=False,
            retryable=True,
            error=f"The endpoint did not answer within {self.options.timeout:g} s.",
        )
        answer = None
        try:
            # One deadline for the whole exchange: per-operation timeouts let an endpoint that
            # trickles out a byte at a time hold a delivery (and its lease) for ever.
            with anyio.move_on_after(self.options.timeout):
                answer = await self._post(addresses, body.encode(), headers)
        except httpx.TimeoutException:
            return timed_out
        except httpx.HTTPError as exc:
            return DeliveryResult(succeeded=False, retryable=True, error=f"{type(exc).__name__}: {exc}")
        if answer is None:
            return timed_out
        return _outcome(answer, url, elapsed_ms=round((time.monotonic() - started) * 1000))

    async def _post(self, addresses: list[netguard.PinnedURL], body: bytes, headers: dict[str, str]) -> Answer:
        """POST to the first checked address that accepts a connection, and read the answer."""
        # Every address gets its share of the deadline to connect, so a silent first address
        # does not use up the time of the others.
        timeout = httpx.Timeout(self.options.timeout, connect=self.options.timeout / len(addresses))
        async with self._host_pools().client(addresses[0].sni_hostname) as client:
            for index, pinned in enumerate(addresses):
                request = client.build_request(
                    "POST",
                    pinned.url,
                    content=body,
                    headers={**headers, "host": pinned.host_header},
                    extensions={"sni_hostname": pinned.sni_hostname},
                    timeout=timeout,
                )
                delivery_progress.set(Progress.MAYBE_SENT)
                try:
                    response = await client.send(request, stream=True)
                except httpx.ConnectError:
                    delivery_progress.set(Progress.NOT_SENT)
                    if index == len(addresses) - 1:
                        raise
                    continue
                delivery_progress.set(Progress.SENT)
                try:
                    return Answer(
                        response.status_code, response.reason_phrase, response.headers, await _read_text(response)
                    )
                finally:
                    # Closing a response that was not read to the end drops its connection.
                    await response.aclose()
        raise AssertionError("check_url(must_resolve=True) returns at least one address")

    def _host_pools(self) -> HostPools:
        if self._pools is None:
            # One TLS context for every pool: loading the CA bundle is the slow part. Without
            # WORDCLAW_CA_BUNDLE it is certifi's, never SSL_CERT_FILE (trust_env=False).
            context = (
                ssl.create_default_context(cafile=self.options.ca_bundle)
                if self.options.ca_bundle
                else httpx.create_ssl_context(trust_env=False)
            )
            # No redirects (a 3xx is a failure, and following one would skip the address check);
            # trust_env=False so an ambient proxy cannot undo the pinning.
            self._pools = HostPools(
                lambda: httpx.AsyncClient(
                    timeout=self.options.timeout, follow_redirects=False, trust_env=False, verify=context
                )
            )
        return self._pools

    async def aclose(self) -> None:
        if self._pools is not None:
            await self._pools.aclose()
            self._pools = None


async def _read_text(response: httpx.Response) -> str:
    """Up to RESPONSE_BODY_LIMIT bytes of the body, as text; the rest is never read."""
    kept = bytearray()
    async with aclosing(response.aiter_raw()) as chunks:
        async for chunk in chunks:
            kept += chunk[: RESPONSE_BODY_LIMIT - len(kept)]
            if len(kept) >= RESPONSE_BODY_LIMIT:
                break
    try:
        decoder = codecs.getincrementaldecoder(response.encoding or "utf-8")(errors="replace")
    except LookupError:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return decoder.decode(bytes(kept))  # not final: a character cut at the limit is dropped


def _outcome(answer: Answer, url: str, *, elapsed_ms: int) -> DeliveryResult:
    status = answer.status_code
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
        "responseBody": answer.body,
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
        error=f"The endpoint answered HTTP {status} {answer.reason_phrase}".rstrip() + ".",
        retryable=status >= 500 or status in RETRYABLE_STATUSES,
        retry_after=ratelimit.retry_after(answer.headers.get("retry-after")),
        raw_meta=raw_meta,
        throttled=throttled,
        throttled_until=throttled_until,
        target_gone=status == 410,
    )
