"""The built-in channel adapters, one class per module, registered as ``wordclaw.adapters`` entry points.

The interface they implement, and the registry that finds them, belong to the core
(``wordclaw_mcp.adapters``); its names are re-exported here for the adapters' convenience.
"""

from __future__ import annotations

from wordclaw_mcp.adapters import (
    Adapter,
    AdapterOptions,
    AdapterRegistry,
    AttemptInfo,
    DeliveryResult,
    DeliveryTarget,
    Progress,
    ResendSafety,
    SealedConfig,
    adapter_classes,
    current_attempt,
    declare_secrets,
    delivery_progress,
    delivery_secrets,
    render_content,
)

from .atom import AtomAdapter
from .bluesky import BlueskyAdapter
from .email import EmailAdapter
from .mastodon import MastodonAdapter
from .rss import RssAdapter
from .webhook import WebhookAdapter
from .x import XAdapter

__all__ = [
    "Adapter",
    "AdapterOptions",
    "AdapterRegistry",
    "AtomAdapter",
    "AttemptInfo",
    "BlueskyAdapter",
    "DeliveryResult",
    "DeliveryTarget",
    "EmailAdapter",
    "MastodonAdapter",
    "Progress",
    "ResendSafety",
    "RssAdapter",
    "SealedConfig",
    "WebhookAdapter",
    "XAdapter",
    "adapter_classes",
    "current_attempt",
    "declare_secrets",
    "delivery_progress",
    "delivery_secrets",
    "render_content",
]
