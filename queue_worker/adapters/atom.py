"""Atom feeds, written as a file and readable as the MCP resource feed://{targetId}."""

from __future__ import annotations

from .feed import FeedAdapter


class AtomAdapter(FeedAdapter):
    channel_type = "atom"
    feed_format = "atom"
