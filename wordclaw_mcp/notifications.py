"""One LISTEN connection per process, fanned out to in-process callbacks."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import asyncpg

from .database import CONNECTION_ERRORS, connect

log = logging.getLogger(__name__)

PLANS_CHANNEL = "wordclaw_plans"  # payload: the id of a plan that ended
JOBS_CHANNEL = "wordclaw_jobs"  # payload: empty; new jobs are queued
CANCEL_CHANNEL = "wordclaw_cancel"  # payload: the id of a running job whose plan was cancelled

RECONNECT_INTERVAL = 5.0  # seconds between attempts to re-establish a lost LISTEN connection

Callback = Callable[[str], None]


class Notifications:
    """Waiters must not rely on a notification arriving: they also poll with a deadline,
    because NOTIFY is lost while the connection is down.

    A lost connection (a database restart, a killed backend) is re-established lazily by
    ``ensure()``, which the worker loop and waiters call, at most every few seconds.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: asyncpg.Connection | None = None
        self._callbacks: dict[str, set[Callback]] = defaultdict(set)
        self._next_attempt = 0.0

    async def start(self) -> None:
        conn = await connect(self._url)
        for channel in (PLANS_CHANNEL, JOBS_CHANNEL, CANCEL_CHANNEL):
            await conn.add_listener(channel, self._dispatch)
        self._conn = conn

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def ensure(self) -> None:
        if self.connected or time.monotonic() < self._next_attempt:
            return
        self._next_attempt = time.monotonic() + RECONNECT_INTERVAL
        try:
            await self.start()
            log.info("LISTEN connection re-established")
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            # Refused too (too many connections, a server starting up): polling covers for it.
            log.warning("LISTEN connection is down (%s); relying on polling", type(exc).__name__)

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
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
