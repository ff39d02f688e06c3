"""One LISTEN connection per process, fanned out to in-process callbacks."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import asyncpg

from .database import connect

log = logging.getLogger(__name__)

PLANS_CHANNEL = "wordclaw_plans"  # payload: the plan id whose status changed
JOBS_CHANNEL = "wordclaw_jobs"  # payload: empty; new jobs are queued

Callback = Callable[[str], None]


class Notifications:
    """Waiters must not rely on a notification arriving: they also poll with a deadline,
    because NOTIFY is lost while the connection is being re-established."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: asyncpg.Connection | None = None
        self._callbacks: dict[str, set[Callback]] = defaultdict(set)

    async def start(self) -> None:
        self._conn = await connect(self._url)
        for channel in (PLANS_CHANNEL, JOBS_CHANNEL):
            await self._conn.add_listener(channel, self._dispatch)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @contextmanager
    def subscribe(self, channel: str, callback: Callback) -> Iterator[None]:
        self._callbacks[channel].add(callback)
        try:
            yield
        finally:
            self._callbacks[channel].discard(callback)

    def _dispatch(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        for callback in list(self._callbacks.get(channel, ())):
            try:
                callback(payload)
            except Exception:
                log.exception("notification callback failed")
