"""What an adapter may keep in the database: a feed's entries, and a login session (encrypted like
target secrets). Given to adapters by the registry (``Adapter.store``), so that channels need no
database access of their own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from . import queries
from .database import transaction
from .secrets import SecretBox, session_binding


class ChannelStore:
    def __init__(self, pool: asyncpg.Pool, secrets: SecretBox) -> None:
        self.pool = pool
        self.secrets = secrets

    async def session(self, target_id: UUID) -> dict[str, str] | None:
        ciphertext = await self.pool.fetchval(queries.GET_CHANNEL_SESSION, target_id)
        return self.secrets.decrypt(ciphertext, bound_to=session_binding(target_id)) if ciphertext else None

    async def put_session(self, target_id: UUID, session: dict[str, str]) -> None:
        await self.pool.execute(
            queries.PUT_CHANNEL_SESSION, target_id, self.secrets.encrypt(session, bound_to=session_binding(target_id))
        )

    async def publish_feed_item(
        self,
        target_id: UUID,
        guid: str,
        entry: dict[str, Any],
        published: datetime,
        limit: int,
        publish: Callable[[list[dict[str, Any]]], Awaitable[None]],
    ) -> None:
        """Upsert a feed's entry, then ``publish`` its newest ``limit`` entries (newest first), under
        the feed's lock and in one transaction: deliveries to one feed take turns, and an entry
        whose publishing fails is not kept either."""
        async with self.pool.acquire() as conn, transaction(conn):
            await conn.execute(queries.LOCK_FEED, target_id)
            await conn.execute(queries.UPSERT_FEED_ITEM, target_id, guid, entry, published)
            await publish([row["entry"] for row in await conn.fetch(queries.FEED_ITEMS, target_id, limit)])

    async def feed_items(self, target_id: UUID, limit: int) -> list[dict[str, Any]]:
        return [row["entry"] for row in await self.pool.fetch(queries.FEED_ITEMS, target_id, limit)]
