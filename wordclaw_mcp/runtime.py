"""What one process opens once and its service and worker share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import asyncpg

from .adapters import AdapterOptions, AdapterRegistry
from .config import Settings
from .database import open_pool
from .errors import DistributionError
from .notifications import Notifications
from .secrets import SecretBox
from .store import ChannelStore


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
        secret_box = SecretBox.from_settings(settings)
        notifications = Notifications(url)
        adapters = AdapterRegistry(
            AdapterOptions(
                allow_private_targets=settings.allow_private_targets,
                timeout=settings.delivery_timeout,
                ca_bundle=settings.ca_bundle,
                feeds_dir=settings.feeds_path,
            ),
            ChannelStore(pool, secret_box),
        )
        try:
            await notifications.start()
            yield cls(settings, pool, notifications, adapters, secret_box)
        finally:
            await notifications.close()
            await adapters.aclose()
            await pool.close()


WORKER_ENTRY_POINT_GROUP = "wordclaw.worker"


def worker_component(name: str) -> Any:
    """The installed worker's ``daemon`` (its class) or ``cli`` (its main).

    Found, like the adapters, through an entry-point group, so that the core and its surfaces
    never import the worker package.
    """
    for entry_point in entry_points(group=WORKER_ENTRY_POINT_GROUP, name=name):
        return entry_point.load()
    raise DistributionError(
        "WORKER_NOT_INSTALLED",
        f"No worker is installed (entry point {name!r} in group {WORKER_ENTRY_POINT_GROUP!r}).",
        "Install the wordclaw-distribution package (pip install wordclaw-distribution), which brings its worker.",
    )
