"""The worker daemon: claim due jobs in batches, deliver them concurrently, record every attempt."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

import anyio
import asyncpg

from wordclaw_mcp import queries
from wordclaw_mcp.database import CONNECTION_ERRORS
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.notifications import JOBS_CHANNEL
from wordclaw_mcp.runtime import Runtime

from .adapters import DeliveryResult, DeliveryTarget
from .retry import retry_delay

log = logging.getLogger(__name__)

REDACTED = "[redacted]"
# Leases are settings.lease_seconds long (far past a delivery's timeout), so checking for
# expired ones every half minute finds a vanished worker's jobs soon enough.
RESCUE_INTERVAL = 30.0
RESCUE_BATCH = 100


@dataclass(frozen=True)
class ClaimedJob:
    id: UUID
    plan_id: UUID
    target_id: UUID
    attempt: int
    max_attempts: int
    payload: dict[str, Any]
    target_name: str
    channel_type: str
    config: dict[str, Any]
    secret_ciphertext: bytes | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ClaimedJob:
        values = dict(row)
        values["payload"] = values.pop("payload_snapshot")
        return cls(**values)


class Worker:
    def __init__(self, runtime: Runtime, *, name: str | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.pool = runtime.pool
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._wake = anyio.Event()
        self._stopping = False
        self._in_flight = 0
        self._idle = anyio.Event()
        self._idle.set()

    def stop(self) -> None:
        """Stop claiming; ``run`` returns once in-flight attempts finish or the grace runs out."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        log.info("worker %s started (concurrency %d)", self.name, self.settings.worker_concurrency)
        next_rescue = 0.0
        with self.runtime.notifications.subscribe(JOBS_CHANNEL, lambda _payload: self._wake.set()):
            async with anyio.create_task_group() as deliveries:
                while not self._stopping:
                    batch = min(self.settings.worker_concurrency - self._in_flight, self.settings.worker_batch_size)
                    try:
                        if anyio.current_time() >= next_rescue:
                            await self.rescue()
                            next_rescue = anyio.current_time() + RESCUE_INTERVAL
                        claimed = await self.claim(batch)
                    except CONNECTION_ERRORS as exc:
                        # Ride out a database restart: keep the in-flight work, retry after the poll.
                        log.warning("worker %s lost the database (%s); retrying", self.name, type(exc).__name__)
                        await self.pool.expire_connections()
                        claimed = []
                    for job in claimed:
                        self._started()
                        deliveries.start_soon(self._process, job)
                    if claimed and len(claimed) == batch:
                        continue  # a full batch: there may be more due right now
                    await self.runtime.notifications.ensure()
                    with anyio.move_on_after(self.settings.poll_interval):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                with anyio.move_on_after(self.settings.shutdown_grace):
                    await self._idle.wait()
                # Past the grace period: cancel, and _process records each interrupted attempt.
                deliveries.cancel_scope.cancel()
        log.info("worker %s stopped", self.name)

    async def claim(self, limit: int) -> list[ClaimedJob]:
        if limit <= 0:
            return []
        rows = await self.pool.fetch(queries.CLAIM_JOBS, limit, float(self.settings.lease_seconds), self.name)
        return [ClaimedJob.from_row(row) for row in rows]

    async def rescue(self) -> int:
        """Requeue (or fail) attempts whose lease ran out. Returns how many were rescued."""
        rescued = await self.pool.fetch(queries.RESCUE_EXPIRED_LEASES, RESCUE_BATCH)
        if rescued:
            log.warning("rescued %d attempt(s) whose worker stopped responding", len(rescued))
        return len(rescued)

    async def run_once(self) -> int:
        """Claim one batch and deliver it to the end. For tests and one-shot runs."""
        jobs = await self.claim(self.settings.worker_batch_size)
        async with anyio.create_task_group() as deliveries:
            for job in jobs:
                self._started()
                deliveries.start_soon(self._process, job)
        return len(jobs)

    def _started(self) -> None:
        self._in_flight += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle

    def _finished(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
        self._wake.set()  # a slot is free

    async def _process(self, job: ClaimedJob) -> None:
        try:
            result = await self.deliver(job)
        except anyio.get_cancelled_exc_class():
            interrupted = DeliveryResult(
                succeeded=False,
                retryable=True,
                error="The worker shut down before this attempt finished; its outcome is unknown.",
            )
            with anyio.CancelScope(shield=True):
                try:
                    await self.record(job, interrupted, delay=0.0)
                except Exception:
                    log.exception("recording the interrupted attempt of job %s failed; its lease will expire", job.id)
                finally:
                    self._finished()
            raise
        try:
            await self.record(job, result)
        except Exception:
            # The job keeps its lease; rescue() requeues it once the lease runs out.
            log.exception("recording attempt %d of job %s failed", job.attempt, job.id)
        finally:
            self._finished()

    async def deliver(self, job: ClaimedJob) -> DeliveryResult:
        secrets: dict[str, str] = {}
        try:
            adapter = self.runtime.adapters.get(job.channel_type)
            if job.secret_ciphertext is not None:
                secrets = self.runtime.secrets.decrypt(job.secret_ciphertext)
            target = DeliveryTarget(id=job.target_id, name=job.target_name, config=job.config, secrets=secrets)
            result = await adapter.deliver(job.payload, target, message_id=str(job.id))
        except DistributionError as exc:
            result = DeliveryResult(succeeded=False, error=f"{exc.code}: {exc.message}")
        except Exception as exc:
            log.exception("adapter %s crashed on job %s", job.channel_type, job.id)
            result = DeliveryResult(
                succeeded=False, retryable=True, error=f"The {job.channel_type} adapter failed: {type(exc).__name__}."
            )
        return redact(result, secrets.values())

    async def record(
        self,
        job: ClaimedJob,
        result: DeliveryResult,
        *,
        delay: float | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> str | None:
        """Write the receipt and move the job on. Returns its new status, or None if it moved on already.

        ``delay`` overrides the retry schedule, for attempts that never got an answer to judge.
        ``conn`` runs it on a connection the caller holds, inside the caller's transaction.
        """
        if delay is None:
            delay = 0.0 if result.succeeded else retry_delay(job.attempt, result.retry_after)
        status = await (conn or self.pool).fetchval(
            queries.RECORD_ATTEMPT,
            job.id,
            job.attempt,
            result.succeeded,
            result.external_url,
            result.status_code,
            result.error,
            result.raw_meta,
            result.retryable,
            delay,
        )
        log.info("job %s attempt %d -> %s%s", job.id, job.attempt, status, f" ({result.error})" if result.error else "")
        return status


def redact(result: DeliveryResult, secrets: Iterable[str]) -> DeliveryResult:
    """Blank any secret value an adapter or a server echoed into what gets stored."""
    values = [value for value in secrets if value]
    if not values:
        return result

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            for secret in values:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, Mapping):
            return {key: scrub(item) for key, item in value.items()}
        if isinstance(value, list):
            return [scrub(item) for item in value]
        return value

    return replace(
        result, error=scrub(result.error), external_url=scrub(result.external_url), raw_meta=scrub(result.raw_meta)
    )
