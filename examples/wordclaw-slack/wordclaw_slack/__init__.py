"""Slack incoming webhooks as a WordClaw Distribution channel: one adapter class, found through an entry point."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl
from pydantic.alias_generators import to_camel

from wordclaw_mcp import http, ratelimit, redaction, text
from wordclaw_mcp.adapters import Adapter, DeliveryResult, DeliveryTarget
from wordclaw_mcp.models import ContentItem, TransformPolicy

__all__ = ["SlackAdapter"]

# Slack shows at most this many characters of a message's text before "Show more".
TEXT_LIMIT = 3000


class SlackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SlackSecrets(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    # The URL is the credential: anyone who has it can post to the channel.
    webhook_url: HttpUrl = Field(description="The incoming webhook's URL, https://hooks.slack.com/services/...")


class SlackAdapter(Adapter):
    channel_type = "slack"
    config_model = SlackConfig
    secrets_model = SlackSecrets
    secrets_required = True

    def transform(self, content: ContentItem, policy: TransformPolicy) -> dict[str, Any]:
        lines = [f"*{content.title}*"]
        if blurb := content.summary or (content.body if policy.include_body else ""):
            lines.append(blurb)
        if content.canonical_url:
            lines.append(f"<{content.canonical_url}>")
        limit = text.Limit("characters", min(policy.max_length or TEXT_LIMIT, TEXT_LIMIT))
        return {"text": text.cut("\n".join(lines), limit).text}

    async def deliver(
        self, payload: dict[str, Any], target: DeliveryTarget, *, message_id: str | None = None
    ) -> DeliveryResult:
        url = target.secrets["webhookUrl"]
        started = time.monotonic()
        try:
            answer = await self.send("POST", url, target=target, json=payload, timeout=self.options.timeout)
        except (http.TargetRefused, http.ConnectError) as exc:
            return DeliveryResult(succeeded=False, retryable=isinstance(exc, http.ConnectError), error=str(exc))
        except http.HttpError as exc:
            return DeliveryResult(succeeded=False, retryable=True, error=f"{type(exc).__name__}: {exc}")
        meta = {"elapsedMs": round((time.monotonic() - started) * 1000), "responseBody": answer.text}
        throttled, until = ratelimit.throttle(answer.status, answer.headers)
        if answer.status == 200:
            return DeliveryResult(succeeded=True, status_code=200, raw_meta=meta)
        return DeliveryResult(
            succeeded=False,
            status_code=answer.status,
            # Slack names the problem in a plain-text body: invalid_payload, no_service, ...
            error=f"Slack answered HTTP {answer.status}: {redaction.scrub(answer.text[:200], [url])}",
            retryable=answer.status >= 500 or answer.status == 429,
            retry_after=ratelimit.retry_after(answer.headers.get("retry-after")),
            raw_meta=meta,
            throttled=throttled,
            throttled_until=until,
            target_gone=answer.status == 410,
        )
