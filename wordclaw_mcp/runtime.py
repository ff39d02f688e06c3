"""What one process opens once and its service and worker share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from queue_worker.adapters import AdapterOptions, AdapterRegistry

from .config import Settings
from .database import open_pool
from .notifications import Notifications
from .secrets import SecretBox


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    pool: asyncpg.Pool
    notifications: Notifications
    adapters: AdapterRegistry
    secrets: SecretBox

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Runtime]:
        """Connect (starting the embedded database if needed), verify the schema, and listen."""
        pool, url = await open_pool(settings)
        notifications = Notifications(url)
        adapters = AdapterRegistry(
            AdapterOptions(
                allow_private_targets=settings.allow_private_targets,
                timeout=settings.delivery_timeout,
                ca_bundle=settings.ca_bundle,
            )
        )
        try:
            await notifications.start()
            yield cls(settings, pool, notifications, adapters, SecretBox.from_settings(settings))
        finally:
            await notifications.close()
            await adapters.aclose()
            await pool.close()
