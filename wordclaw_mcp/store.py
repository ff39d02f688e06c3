"""What an adapter may keep in the database: today, a feed's entries. Given to adapters by the
registry (``Adapter.store``), so that channels need no database access of their own."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from . import queries


class ChannelStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def put_feed_item(self, target_id: UUID, guid: str, entry: dict[str, Any], published: datetime) -> None:
        await self.pool.execute(queries.UPSERT_FEED_ITEM, target_id, guid, entry, published)

    async def feed_items(self, target_id: UUID, limit: int) -> list[dict[str, Any]]:
        return [row["entry"] for row in await self.pool.fetch(queries.FEED_ITEMS, target_id, limit)]
