"""The worker daemon: claim due jobs in batches, deliver them concurrently, record every attempt."""

from __future__ import annotations

import logging
import os
import socket
import traceback
from collections.abc import Iterable, Mapping, Sequence
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


@dataclass(frozen=True)
class Outcome:
    """An attempt's result on its way to the database."""

    job: ClaimedJob
    result: DeliveryResult
    retry_delay: float

    @classmethod
    def of(cls, job: ClaimedJob, result: DeliveryResult) -> Outcome:
        """With the retry delay from the schedule (unused when the attempt succeeded)."""
        return cls(job, result, 0.0 if result.succeeded else retry_delay(job.attempt, result.retry_after))


class Worker:
    """Claims due jobs in batches, delivers them concurrently, and records outcomes in batches.

    Outcomes are group-committed: one flusher writes everything that finished while its
    previous write was in flight, in one statement. Under load that is one commit (and one
    trigger firing) per batch rather than per job; when idle it is one write per delivery,
    with no added delay.
    """

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
        self._outcomes: list[Outcome] = []
        self._outcome_added = anyio.Event()
        self._delivering = False

    def stop(self) -> None:
        """Stop claiming; ``run`` returns once in-flight attempts finish or the grace runs out."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        log.info("worker %s started (concurrency %d)", self.name, self.settings.worker_concurrency)
        self._delivering = True
        async with anyio.create_task_group() as flusher:
            flusher.start_soon(self._flush_outcomes)
            try:
                await self._claim_and_deliver()
            finally:
                self._delivering = False
                self._outcome_added.set()  # the flusher writes what is left, then returns
        log.info("worker %s stopped", self.name)

    async def _claim_and_deliver(self) -> None:
        batch_size = self.settings.worker_batch_size
        next_rescue = 0.0
        with self.runtime.notifications.subscribe(JOBS_CHANNEL, lambda _payload: self._wake.set()):
            async with anyio.create_task_group() as deliveries:
                while not self._stopping:
                    free = self.settings.worker_concurrency - self._in_flight
                    # Claim in real batches: waking for every freed slot would claim one job at a time.
                    batch = min(free, batch_size) if free >= max(1, batch_size // 2) or not self._in_flight else 0
                    claimed: list[ClaimedJob] = []
                    try:
                        if anyio.current_time() >= next_rescue:
                            await self.rescue()
                            next_rescue = anyio.current_time() + RESCUE_INTERVAL
                        claimed = await self.claim(batch)
                    except CONNECTION_ERRORS as exc:
                        # Ride out a database restart: keep the in-flight work, retry after the poll.
                        log.warning("worker %s lost the database (%s); retrying", self.name, type(exc).__name__)
                        await self.pool.expire_connections()
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
        """Claim one batch, deliver it, and record it in one write. For tests and one-shot runs."""
        jobs = await self.claim(self.settings.worker_batch_size)
        results: list[DeliveryResult] = [DeliveryResult(succeeded=False)] * len(jobs)

        async def deliver(index: int, job: ClaimedJob) -> None:
            results[index] = await self.deliver(job)

        async with anyio.create_task_group() as deliveries:
            for index, job in enumerate(jobs):
                deliveries.start_soon(deliver, index, job)
        await self.record_many([Outcome.of(job, result) for job, result in zip(jobs, results, strict=True)])
        return len(jobs)

    def _started(self) -> None:
        self._in_flight += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle

    def _finished(self, done: Outcome) -> None:
        self._outcomes.append(done)
        self._outcome_added.set()

    def _released(self, count: int) -> None:
        # A slot frees when its outcome is written, not when the delivery returns: claims
        # cannot outrun the writes, and a crash leaves at most `concurrency` attempts unrecorded.
        self._in_flight -= count
        if self._in_flight == 0:
            self._idle.set()
        self._wake.set()

    async def _process(self, job: ClaimedJob) -> None:
        try:
            result = await self.deliver(job)
        except anyio.get_cancelled_exc_class():
            interrupted = DeliveryResult(
                succeeded=False,
                retryable=True,
                error="The worker shut down before this attempt finished; its outcome is unknown.",
            )
            self._finished(Outcome(job, interrupted, retry_delay=0.0))
            raise
        self._finished(Outcome.of(job, result))

    async def _flush_outcomes(self) -> None:
        """Write finished attempts until the worker stops and nothing is left to write."""
        while self._delivering or self._outcomes:
            await self._outcome_added.wait()
            self._outcome_added = anyio.Event()
            while self._outcomes:
                batch, self._outcomes = self._outcomes, []
                try:
                    await self.record_many(batch)
                except CONNECTION_ERRORS as exc:
                    if not self._delivering:
                        # Shutting down with no database: the leases run out and rescue() requeues.
                        log.error("could not record %d attempt(s) before stopping (%s)", len(batch), exc)
                        self._released(len(batch))
                        return
                    log.warning("recording %d attempt(s) failed (%s); retrying", len(batch), type(exc).__name__)
                    self._outcomes[:0] = batch
                    await self.pool.expire_connections()
                    await anyio.sleep(self.settings.poll_interval)
                    continue
                except Exception:
                    # Not retried: a poison batch must not wedge the worker. The leases run out
                    # and rescue() requeues these attempts.
                    log.exception("recording %d attempt(s) failed; leaving them to lease expiry", len(batch))
                self._released(len(batch))

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
            # Exception texts can carry what an adapter was sending (h11 quotes a bad header's
            # value), so the traceback is scrubbed like a receipt before it is logged.
            trace = scrub("".join(traceback.format_exception(exc)), secrets.values())
            log.error("adapter %s crashed on job %s:\n%s", job.channel_type, job.id, trace)
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
        """Record one attempt. Returns the job's new status, or None if it had moved on already.

        ``delay`` overrides the retry schedule, for attempts that never got an answer to judge.
        ``conn`` runs it on a connection the caller holds, inside the caller's transaction.
        """
        done = Outcome.of(job, result) if delay is None else Outcome(job, result, delay)
        return (await self.record_many([done], conn=conn)).get(job.id)

    async def record_many(
        self, outcomes: Sequence[Outcome], *, conn: asyncpg.Connection | None = None
    ) -> dict[UUID, str]:
        """Write receipts and move the jobs on, in one statement. Returns the new status by job id."""
        if not outcomes:
            return {}
        rows = await (conn or self.pool).fetch(
            queries.RECORD_ATTEMPTS,
            [o.job.id for o in outcomes],
            [o.job.attempt for o in outcomes],
            [o.result.succeeded for o in outcomes],
            [o.result.external_url for o in outcomes],
            [o.result.status_code for o in outcomes],
            [o.result.error for o in outcomes],
            [o.result.raw_meta for o in outcomes],
            [o.result.retryable for o in outcomes],
            [o.retry_delay for o in outcomes],
        )
        statuses = {row["id"]: row["status"] for row in rows}
        for o in outcomes:
            if not o.result.succeeded:
                log.info("job %s attempt %d -> %s: %s", o.job.id, o.job.attempt, statuses.get(o.job.id), o.result.error)
        return statuses


def scrub(value: Any, secrets: Iterable[str]) -> Any:
    """``value`` (a string, or JSON-like data) with every secret value replaced by REDACTED."""
    values = [secret for secret in secrets if secret]
    if isinstance(value, str):
        for secret in values:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, Mapping):
        return {key: scrub(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub(item, values) for item in value]
    return value


def redact(result: DeliveryResult, secrets: Iterable[str]) -> DeliveryResult:
    """Blank any secret value an adapter or a server echoed into what gets stored."""
    values = [secret for secret in secrets if secret]
    if not values:
        return result
    return replace(
        result,
        error=scrub(result.error, values),
        external_url=scrub(result.external_url, values),
        raw_meta=scrub(result.raw_meta, values),
    )
