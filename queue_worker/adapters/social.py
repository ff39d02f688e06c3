"""What the social channels (Mastodon, Bluesky, X) share: a post counted and cut as the network
counts, a base URL checked like any target's, and what an unsent request means. Not a channel."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel

from wordclaw_mcp import http, netguard, text
from wordclaw_mcp.adapters import Adapter, DeliveryResult, social_post
from wordclaw_mcp.models import ContentItem, TransformPolicy


class SocialAdapter(Adapter):
    counting: ClassVar[str]  # the text module's rule: "mastodon", "bluesky" or "x"
    text_field: ClassVar[str] = "text"  # the payload key the post goes under

    async def check_target(self, config: BaseModel) -> None:
        await netguard.check_url(str(config.base_url), allow_private=self.options.allow_private_targets)  # type: ignore[attr-defined]

    def channel_limit(self, config: dict[str, Any]) -> int:
        """The longest post the target takes; an instance may set its own."""
        return text.limit_for(self.counting).max_length

    def policy_for(self, config: dict[str, Any], policy: TransformPolicy) -> TransformPolicy:
        limit = self.channel_limit(config)
        return policy.model_copy(update={"max_length": min(policy.max_length or limit, limit)})

    def transform(self, content: ContentItem, policy: TransformPolicy) -> dict[str, Any]:
        return {self.text_field: self.fit(content, policy).text}

    def fit(self, content: ContentItem, policy: TransformPolicy) -> text.Cut:
        return social_post(content, policy, text.limit_for(self.counting, policy.max_length))


def unsent(exc: http.TargetRefused | http.ConnectError) -> DeliveryResult:
    """Nothing was sent: safe to try again, unless the address is refused for good."""
    retryable = isinstance(exc, http.ConnectError) or exc.code == "TARGET_UNRESOLVABLE"
    return DeliveryResult(succeeded=False, retryable=retryable, error=str(exc))
