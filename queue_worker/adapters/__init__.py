"""Channel adapters, discovered through the ``wordclaw.adapters`` entry-point group."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from wordclaw_mcp.errors import DistributionError

from .base import (
    Adapter,
    AdapterOptions,
    DeliveryResult,
    DeliveryTarget,
    Progress,
    delivery_progress,
    render_content,
    truncate,
)
from .webhook import WebhookAdapter

__all__ = [
    "Adapter",
    "AdapterOptions",
    "AdapterRegistry",
    "DeliveryResult",
    "DeliveryTarget",
    "Progress",
    "WebhookAdapter",
    "adapter_classes",
    "delivery_progress",
    "render_content",
    "truncate",
]

ENTRY_POINT_GROUP = "wordclaw.adapters"

log = logging.getLogger(__name__)


def adapter_classes() -> dict[str, type[Adapter]]:
    # Built-ins first so a source checkout that was never pip-installed still has them.
    classes: dict[str, type[Adapter]] = {WebhookAdapter.channel_type: WebhookAdapter}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry_point.load()
        except Exception:
            log.exception("adapter entry point %s could not be loaded; skipping it", entry_point.name)
            continue
        classes[cls.channel_type] = cls
    return classes


class AdapterRegistry:
    """One instance of each adapter, shared by the plans service and the worker."""

    def __init__(self, options: AdapterOptions | None = None) -> None:
        options = options or AdapterOptions()
        # One HTTP client for every channel, so the process has one connection pool and one
        # limit on connections, whatever the channels.
        self.http = options.http_client()
        self._adapters = {name: cls(options) for name, cls in adapter_classes().items()}
        for adapter in self._adapters.values():
            adapter.http = self.http

    def register(self, adapter: Adapter) -> None:
        """Add or replace the adapter for its channel type (for embedding and benchmarks)."""
        self._adapters[adapter.channel_type] = adapter

    @property
    def channel_types(self) -> list[str]:
        return sorted(self._adapters)

    def get(self, channel_type: str) -> Adapter:
        try:
            return self._adapters[channel_type]
        except KeyError:
            raise DistributionError(
                "UNSUPPORTED_CHANNEL_TYPE",
                f"No adapter handles channel type {channel_type!r}.",
                f"Use one of: {', '.join(self.channel_types)}.",
                supportedChannelTypes=self.channel_types,
            ) from None

    async def aclose(self) -> None:
        for adapter in self._adapters.values():
            await adapter.aclose()
        await self.http.aclose()
