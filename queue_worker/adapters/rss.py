"""RSS 2.0 feeds, written as a file and readable as the MCP resource feed://{targetId}."""

from __future__ import annotations

from .feed import FeedAdapter


class RssAdapter(FeedAdapter):
    channel_type = "rss"
    feed_format = "rss"
