"""Retention: delete finished jobs (with their receipts), the plans they leave empty, old events
and old entitlement decisions.

Succeeded and cancelled jobs go ``retain_succeeded_days`` after they finished, failed jobs (the
dead letters) after ``retain_failed_days``, events after ``retain_events_days``, entitlement
decisions after ``retain_decisions_days``; 0 or less keeps that kind for ever. Nothing of a plan
that still has a queued or running job is deleted.

Every statement deletes at most ``batch_size`` rows, oldest first, skipping rows that another
transaction holds, so pruning never waits on a worker and never holds a lock for long; each
kind is pruned batch after batch until one comes back short. A worker calls :func:`prune`
every ``Settings.retention_interval`` seconds; ``wordclaw retention prune`` calls
:func:`prune_once`. The statements are in the retention section of queries.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from . import queries
from .config import Settings
from .database import CONNECTION_ERRORS, open_pool, transaction
from .errors import DatabaseUnavailable

log = logging.getLogger(__name__)

BATCH_SIZE = 1000
SECONDS_PER_DAY = 86400.0


@dataclass
class PruneReport:
    """What one pruning run deleted."""

    succeeded_jobs: int = 0
    cancelled_jobs: int = 0
    failed_jobs: int = 0
    receipts: int = 0  # of the jobs above, deleted with them
    plans: int = 0  # final plans left with no job
    events: int = 0
    decisions: int = 0  # entitlement decisions
    batches: int = 0  # delete transactions run, the last, short one of each kind included
    largest_batch: int = 0  # the most jobs or events one statement deleted

    @property
    def jobs(self) -> int:
        return self.succeeded_jobs + self.cancelled_jobs + self.failed_jobs

    def summary(self) -> str:
        return (
            f"pruned {self.succeeded_jobs} succeeded, {self.cancelled_jobs} cancelled and {self.failed_jobs} failed "
            f"job(s) with {self.receipts} receipt(s), {self.plans} plan(s), {self.events} event(s) and "
            f"{self.decisions} entitlement decision(s) in {self.batches} batch(es)"
        )


async def prune(pool: asyncpg.Pool, settings: Settings, *, batch_size: int = BATCH_SIZE) -> PruneReport:
    """Delete what the retention settings say has been kept long enough; returns the counts.

    Database errors propagate: what was deleted before one stays deleted, and the next run
    carries on from there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    report = PruneReport()
    if settings.retain_succeeded_days > 0:
        age = settings.retain_succeeded_days * SECONDS_PER_DAY
        report.succeeded_jobs = await _prune_jobs(pool, report, "succeeded", age, batch_size)
        report.cancelled_jobs = await _prune_jobs(pool, report, "cancelled", age, batch_size)
    if settings.retain_failed_days > 0:
        age = settings.retain_failed_days * SECONDS_PER_DAY
        report.failed_jobs = await _prune_jobs(pool, report, "failed", age, batch_size)
    if settings.retain_events_days > 0:
        age = settings.retain_events_days * SECONDS_PER_DAY
        report.events = await _prune_each(pool, report, queries.PRUNE_EVENTS, age, batch_size)
    if settings.retain_decisions_days > 0:
        age = settings.retain_decisions_days * SECONDS_PER_DAY
        report.decisions = await _prune_each(pool, report, queries.PRUNE_DECISIONS, age, batch_size)
    if report.jobs or report.plans or report.events or report.decisions:
        log.info("retention: %s", report.summary())
    return report


async def _prune_jobs(pool: asyncpg.Pool, report: PruneReport, status: str, age: float, batch_size: int) -> int:
    """Jobs of ``status`` older than ``age`` seconds, batch after batch; returns how many went.

    Their receipts, the plans they leave empty and the batches are counted into ``report``.
    """
    total = 0
    while True:
        # One short transaction per batch: the jobs and their plans stay locked until the emptied
        # plans are deleted, so no other pruner can take the same plan's last jobs meanwhile.
        async with pool.acquire() as conn, transaction(conn):
            deleted = await conn.fetchrow(queries.PRUNE_FINISHED_JOBS, status, age, batch_size)
            plans = await conn.fetchval(queries.PRUNE_EMPTIED_PLANS, deleted["plan_ids"]) if deleted["jobs"] else 0
        jobs = deleted["jobs"]
        total += jobs
        report.receipts += deleted["receipts"]
        report.plans += plans
        _count_batch(report, jobs)
        if jobs < batch_size:
            return total


async def _prune_each(pool: asyncpg.Pool, report: PruneReport, statement: str, age: float, batch_size: int) -> int:
    """Rows ``statement`` deletes (events, decisions) older than ``age`` seconds, batch after batch."""
    total = 0
    while True:
        rows = await pool.fetchval(statement, age, batch_size)
        total += rows
        _count_batch(report, rows)
        if rows < batch_size:
            return total


def _count_batch(report: PruneReport, rows: int) -> None:
    report.batches += 1
    report.largest_batch = max(report.largest_batch, rows)


async def prune_once(settings: Settings, *, batch_size: int = BATCH_SIZE) -> PruneReport:
    """Connect (bringing the schema up to date, as every process does), prune, and disconnect."""
    pool, _url = await open_pool(settings, max_size=1)
    try:
        return await prune(pool, settings, batch_size=batch_size)
    except CONNECTION_ERRORS as exc:
        raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
    finally:
        await pool.close()
