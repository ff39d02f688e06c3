"""The worker daemon: claim due jobs in batches, deliver them concurrently, record every attempt."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import traceback
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import anyio
import asyncpg

from wordclaw_mcp import queries, redaction, retention
from wordclaw_mcp.database import CONNECTION_ERRORS, transaction
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.keys import verify_stored_secrets
from wordclaw_mcp.notifications import CANCEL_CHANNEL, JOBS_CHANNEL
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.secrets import target_binding

from .adapters import (
    Adapter,
    AttemptInfo,
    DeliveryResult,
    DeliveryTarget,
    Progress,
    ResendSafety,
    current_attempt,
    delivery_progress,
    delivery_secrets,
)
from .retry import retry_delay

log = logging.getLogger(__name__)

RESCUE_BATCH = 100
# A 429 that names no time suspends its target for a back-off doubling from 1 s up to this.
MAX_THROTTLE_BACKOFF = 600.0
# A worker whose heartbeat has been silent for this many leases is gone; its row is removed.
SILENT_LEASES = 10
# A job this worker cannot decrypt waits this long before any worker claims it again.
RELEASE_DELAY = 60.0
# A claimed job this worker never started (it is stopping) may be claimed again at once.
NOT_STARTED_DELAY = 0.0
# Back-off after a database error: doubling from the poll interval up to this.
MAX_BACKOFF = 30.0

UNKNOWN_OUTCOME = "The worker holding this attempt stopped responding; its outcome is unknown."
# The remediation every DELIVERY_OUTCOME_UNKNOWN ends with.
CHECK_THEN_REDRIVE = (
    "Check the account for the post, and redrive the job (retry_plan, or wordclaw jobs redrive) only if it is "
    "not there."
)
SENDING_WHEN_LOST = (
    "DELIVERY_OUTCOME_UNKNOWN: the worker sending this attempt stopped responding after its request may have "
    "gone out, and this channel cannot take a request twice, so it is not sent again by itself. "
    + CHECK_THEN_REDRIVE
)
RESEND_WINDOW_PASSED = (
    "DELIVERY_OUTCOME_UNKNOWN: an earlier attempt may have posted, and the channel keeps its idempotency key "
    "only so long; a retry now could post twice, so it is not sent again by itself. " + CHECK_THEN_REDRIVE
)
# A request is let go out on an expiring key only this long before the key may expire: room for
# the request itself and for clocks.
RESEND_MARGIN = 120.0
TARGET_INACTIVE = "TARGET_INACTIVE: the target was deactivated; this job will not be delivered."
TARGET_GONE = "TARGET_GONE: the target answered 410 Gone and was deactivated; this job was not delivered."
THROTTLED_TOO_LONG = "THROTTLED_TOO_LONG: the channel kept throttling this job past the limit; it was not delivered."
INTERRUPTED = "The worker shut down before this attempt finished; its outcome is unknown."

# Errors that say nothing about the batch being written: the database is restarting, failing
# over (read-only), out of connections, or picked this transaction as a deadlock victim. The
# same write is tried again after a back-off. Any other error is the batch's own fault.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.TransactionRollbackError,
    asyncpg.LockNotAvailableError,
    asyncpg.InvalidCachedStatementError,
)

RECONNECT_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, asyncpg.ReadOnlySQLTransactionError)

# PostgreSQL stores neither NUL nor lone surrogates (text and jsonb refuse them).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


# Why a job whose grant went away between its plan and its delivery fails without being sent.
ENTITLEMENT_GONE = {
    "ENTITLEMENT_REVOKED": "ENTITLEMENT_REVOKED: the entitlement this job relied on was revoked after the plan was "
    "made, so nothing was sent.",
    "ENTITLEMENT_EXPIRED": "ENTITLEMENT_EXPIRED: the entitlement this job relied on expired before it could be "
    "delivered, so nothing was sent.",
}


@dataclass(frozen=True)
class ClaimedJob:
    id: UUID
    plan_id: UUID
    target_id: UUID
    attempt: int
    max_attempts: int
    priority: int
    payload: dict[str, Any]
    target_name: str
    channel_type: str
    config: dict[str, Any]
    secret_ciphertext: bytes | None
    # The grant the job relies on (None: the plan's agent created the item), and the code of its
    # denial when the grant was revoked or expired since the plan was made.
    entitlement_id: UUID | None = None
    denied: str | None = None
    # The claim this worker holds: every write about the attempt names it.
    claim_token: UUID | None = None
    # Whether the server that registered the target allowed private addresses.
    private_addresses_allowed: bool = False
    # How long before the claim (database clock) an attempt may first have reached the channel.
    maybe_sent_seconds_ago: float | None = None
    # Whether the target was backing off a 429 when claimed: a success resets it.
    target_backing_off: bool = False
    # When this worker received the claim (its monotonic clock).
    claimed_at: float = field(default=0.0, compare=False)

    @classmethod
    def from_row(cls, row: asyncpg.Record, claimed_at: float = 0.0) -> ClaimedJob:
        values = dict(row)
        values["payload"] = values.pop("payload_snapshot")
        return cls(**values, claimed_at=claimed_at)

    def seconds_since_maybe_sent(self) -> float | None:
        if self.maybe_sent_seconds_ago is None:
            return None
        return self.maybe_sent_seconds_ago + time.monotonic() - self.claimed_at


@dataclass(frozen=True)
class Outcome:
    """An attempt's result on its way to the database.

    A ``released`` attempt sent nothing (this worker cannot decrypt the target's secrets): the
    job goes back uncounted, without a receipt, for a worker that holds the right key.
    """

    job: ClaimedJob
    result: DeliveryResult
    retry_delay: float
    released: bool = False
    # Whether the attempt's request may have reached the channel.
    maybe_sent: bool = False
    # How long after an attempt that may have posted the channel can still take a resend safely
    # (seconds; None: no limit).
    resend_window: float | None = None

    @classmethod
    def of(
        cls,
        job: ClaimedJob,
        result: DeliveryResult,
        *,
        maybe_sent: bool | None = None,
        resend_window: float | None = None,
        delay: float | None = None,
    ) -> Outcome:
        """With the retry delay from the schedule unless given (unused when the attempt succeeded).
        Unless told, a request that the channel did not refuse is taken to have gone out."""
        if delay is None:
            delay = 0.0 if result.succeeded else retry_delay(job.attempt, result.retry_after)
        sent = result.succeeded or not result.refused if maybe_sent is None else maybe_sent
        return cls(job, result, delay, maybe_sent=sent, resend_window=resend_window)

    @classmethod
    def unsent(cls, job: ClaimedJob, error: str) -> Outcome:
        """An attempt that sent nothing and fails the job."""
        return cls.of(job, DeliveryResult(succeeded=False, error=error), maybe_sent=False)

    @classmethod
    def judged(
        cls,
        job: ClaimedJob,
        result: DeliveryResult,
        safety: ResendSafety,
        progress: Progress,
        *,
        delay: float | None = None,
    ) -> Outcome:
        """An attempt's outcome as the channel's resend safety allows.

        A request that went out and was not refused may have reached the channel. On a channel that
        cannot take a request twice, such an attempt is never tried again by itself: it ends
        DELIVERY_OUTCOME_UNKNOWN, whatever the adapter thought of retrying it.
        """
        window = None if safety.key_lifetime is None else max(safety.key_lifetime - RESEND_MARGIN, 0.0)
        if result.succeeded:
            return cls(job, result, 0.0, maybe_sent=True, resend_window=window)
        refused = result.refused or result.status_code == 429  # throttled before it was looked at
        maybe_sent = progress is not Progress.NOT_SENT and not refused
        if safety.resend_is_unsafe and maybe_sent and (result.retryable or result.throttled):
            said = (result.error or "no answer").removeprefix("DELIVERY_OUTCOME_UNKNOWN: ")
            result = replace(
                result,
                retryable=False,
                throttled=False,
                throttled_until=None,
                error=f"DELIVERY_OUTCOME_UNKNOWN: the request may have reached the channel ({said}), and this "
                f"channel cannot take a request twice, so it is not sent again by itself. {CHECK_THEN_REDRIVE}",
            )
        return cls.of(job, result, maybe_sent=maybe_sent, resend_window=window, delay=delay)

    @classmethod
    def release(cls, job: ClaimedJob, error: str, delay: float = RELEASE_DELAY) -> Outcome:
        return cls(job, DeliveryResult(succeeded=False, retryable=True, error=error), delay, released=True)

    def unstorable(self, exc: Exception) -> Outcome:
        """This outcome stripped to what cannot fail to store, saying why."""
        reason = type(exc).__name__ + (f" {exc.sqlstate}" if isinstance(exc, asyncpg.PostgresError) else "")
        verdict = "succeeded" if self.result.succeeded else "failed"
        result = replace(
            self.result,
            external_url=None,
            raw_meta={},
            error=f"The attempt {verdict}, but its details could not be stored ({reason}).",
        )
        return replace(self, result=result)


class Backoff:
    """Delays that double from ``first`` up to ``cap``, until ``reset``."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap = max(first, 0.01), cap
        self._next = self.first

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


class Worker:
    """Claims due jobs in batches, delivers them concurrently, and records outcomes in batches.

    A worker has in hand at most ``concurrency + batch`` claimed jobs: up to ``concurrency``
    being delivered, the rest claimed ahead and waiting for a free slot, so that a slot that
    frees starts its next job at once rather than after a claim's round trip. Up to as many
    again may be delivered and waiting for their write, so that deliveries do not wait on
    writes either; past that, claims wait for the writes to catch up.

    Outcomes are group-committed: one flusher writes everything that finished while its
    previous write was in flight, in one statement. Under load that is one commit (and one
    trigger firing) per batch rather than per job; when idle it is one write per delivery,
    with no added delay.

    No database error stops the worker: it logs, backs off and carries on, keeping its
    in-flight work and the outcomes it has yet to write.
    """

    def __init__(self, runtime: Runtime, *, name: str | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.pool = runtime.pool
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._wake = anyio.Event()
        self._stop_requested = anyio.Event()
        self._stopping = False
        self._holding = 0  # claimed and not yet recorded
        self._sending = 0  # deliveries in flight
        # Claimed jobs waiting for a free delivery slot; jobs someone waits on go to the front.
        self._ready: deque[ClaimedJob] = deque()
        self._job_ready = anyio.Event()  # set, and replaced, when jobs join _ready or the worker stops
        # Claimed jobs whose plan was cancelled before their delivery started.
        self._cancelled_before_start: set[UUID] = set()
        self._idle = anyio.Event()
        self._idle.set()
        self._outcomes: list[Outcome] = []
        self._outcome_added = anyio.Event()
        self._delivering = False
        # The attempts this worker claimed and has not recorded, whose leases its heartbeat
        # renews: job id -> claim token.
        self._held: dict[UUID, UUID | None] = {}
        self._missed: set[UUID] = set()  # held attempts the last renewal did not renew
        self._flushed = anyio.Event()
        # The deliveries in flight, so that a cancelled plan can stop them.
        self._cancellable: dict[UUID, anyio.CancelScope] = {}

    def stop(self) -> None:
        """Stop claiming; ``run`` returns once in-flight attempts finish or the grace runs out."""
        self._stopping = True
        self._stop_requested.set()
        self._wake.set()
        self._job_ready.set()

    async def check_secret_keys(self) -> None:
        """Refuse to start unless every stored secret decrypts for its own row: said at start, not at delivery."""
        await verify_stored_secrets(self.pool, self.runtime.secrets)

    async def run(self) -> None:
        log.info(
            "worker %s started (concurrency %d, batch %d, event loop %s)",
            self.name,
            self.settings.worker_concurrency,
            self.settings.worker_batch_size,
            type(asyncio.get_running_loop()).__module__.partition(".")[0],
        )
        self._delivering = True
        try:
            await self.heartbeat()
        except Exception as exc:
            await self._database_trouble(exc, "registering")
        async with anyio.create_task_group() as background:
            background.start_soon(self._flush_outcomes)
            background.start_soon(self._beat)
            background.start_soon(self._prune_periodically)
            try:
                await self._claim_and_deliver()
            finally:
                self._delivering = False
                self._outcome_added.set()  # the flusher writes what is left, then returns
            await self._flushed.wait()
            background.cancel_scope.cancel()  # the heartbeat
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await self.pool.execute(queries.DEREGISTER_WORKER, self.name)
            except Exception as exc:
                log.warning("worker %s could not deregister (%s); its row ages out", self.name, exc)
        log.info("worker %s stopped", self.name)

    @property
    def heartbeat_interval(self) -> float:
        return self.settings.lease_seconds / 3

    @property
    def rescue_interval(self) -> float:
        # A vanished worker's job is claimed again within lease + this.
        return max(0.5, min(5.0, self.settings.lease_seconds / 6))

    async def heartbeat(self) -> set[UUID]:
        """Renew this worker's row and the leases of the attempts it holds, in one statement.

        Returns the attempts it turned out to have lost (their lease ran out and they were
        rescued): it stops renewing them, never starts those it had not started, and their late
        results cannot move their jobs. An attempt is judged lost when two renewals in a row miss
        it: one renewal alone also misses an attempt whose outcome is being written at that
        moment, which is not lost at all.
        """
        held = dict(self._held)
        rows = await self.pool.fetch(
            queries.HEARTBEAT,
            list(held),
            list(held.values()),
            self.name,
            socket.gethostname(),
            os.getpid(),
            self.settings.worker_concurrency,
            float(self.settings.lease_seconds),
        )
        # The fallback for a lost cancel notification.
        for row in rows:
            if row["cancel_requested"]:
                self.cancel_in_flight(row["id"])
        renewed = {row["id"] for row in rows}
        missed = {job_id for job_id in held if job_id not in renewed and self._held.get(job_id) == held[job_id]}
        lost, self._missed = missed & self._missed, missed - self._missed
        for job_id in lost:
            del self._held[job_id]
        if lost:
            log.warning("worker %s lost the lease of %d attempt(s); another worker may have them", self.name, len(lost))
            self._drop_unstarted(lost)
        return lost

    def _drop_unstarted(self, lost: set[UUID]) -> None:
        """Forget claimed jobs not yet started whose claim another worker may now hold: nothing is
        sent and nothing is written for them."""
        dropped = [job for job in self._ready if job.id in lost]
        if dropped:
            self._ready = deque(job for job in self._ready if job.id not in lost)
            self._cancelled_before_start -= lost
            self._forget(len(dropped))

    async def _prune_periodically(self) -> None:
        """Delete what retention no longer keeps, and the rows of workers long silent (killed).

        Every worker does it; SKIP LOCKED shares the work.
        """
        while True:
            try:
                await retention.prune(self.pool, self.settings)
                await self.pool.execute(queries.PRUNE_WORKERS, float(self.settings.lease_seconds * SILENT_LEASES))
            except Exception as exc:
                await self._database_trouble(exc, "pruning old rows")
            await anyio.sleep(self.settings.retention_interval)

    async def _beat(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval)
            try:
                await self.heartbeat()
            except Exception as exc:
                await self._database_trouble(exc, "renewing leases")

    def _claim_size(self) -> int:
        """How many jobs to claim now: a batch once half of one is free, never more than is free.

        Waking for every freed place would claim one job at a time; waiting for a whole batch
        to free would leave slots idle behind one slow delivery. Outcomes waiting for their
        write have room of their own, so a write's round trip does not hold claims back,
        and claims stop only when the writes fall behind.
        """
        batch = self.settings.worker_batch_size
        room = self.settings.worker_concurrency + batch
        in_hand = self._sending + len(self._ready)
        if self._holding - in_hand > room:
            return 0
        free = room - in_hand
        return min(free, batch) if free >= max(1, batch // 2) or not self._holding else 0

    async def _claim_and_deliver(self) -> None:
        next_rescue = 0.0
        backoff = Backoff(self.settings.poll_interval, MAX_BACKOFF)
        notifications = self.runtime.notifications
        with (
            notifications.subscribe(JOBS_CHANNEL, lambda _payload: self._wake.set()),
            notifications.subscribe(CANCEL_CHANNEL, self._on_cancel),
        ):
            async with anyio.create_task_group() as deliveries:
                for _ in range(self.settings.worker_concurrency):
                    deliveries.start_soon(self._deliver_ready, name="delivery slot")
                while not self._stopping:
                    size = self._claim_size()
                    claimed: list[ClaimedJob] = []
                    try:
                        if anyio.current_time() >= next_rescue:
                            await self.rescue()
                            next_rescue = anyio.current_time() + self.rescue_interval
                        claimed = await self.claim(size)
                    except Exception as exc:
                        await self._database_trouble(exc, "claiming jobs")
                        with anyio.move_on_after(backoff.next()):
                            await self._stop_requested.wait()
                        continue
                    backoff.reset()
                    self._hold(claimed)
                    if claimed and len(claimed) == size:
                        continue  # a full batch: there may be more due right now
                    await self.runtime.notifications.ensure()
                    with anyio.move_on_after(self.settings.poll_interval):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                self._release_unstarted()
                with anyio.move_on_after(self.settings.shutdown_grace):
                    await self._idle.wait()
                # Past the grace period: cancel, and _process records each interrupted attempt.
                deliveries.cancel_scope.cancel()

    async def _database_trouble(self, exc: Exception, doing: str) -> None:
        if isinstance(exc, CONNECTION_ERRORS):
            log.warning("worker %s lost the database while %s (%s); retrying", self.name, doing, type(exc).__name__)
        elif isinstance(exc, asyncpg.PostgresError):
            log.warning(
                "worker %s: the database refused %s (%s: %s); backing off", self.name, doing, type(exc).__name__, exc
            )
        else:
            log.error("worker %s failed while %s; backing off", self.name, doing, exc_info=exc)
        if isinstance(exc, RECONNECT_ERRORS):
            # Replace every pooled connection at once rather than fail once per dead one; after
            # a failover the old sessions may also be bound to a server that is now read-only.
            await self.pool.expire_connections()

    async def claim(self, limit: int) -> list[ClaimedJob]:
        if limit <= 0:
            return []
        rows = await self.pool.fetch(
            queries.CLAIM_JOBS, limit, float(self.settings.lease_seconds), self.name, uuid.uuid4()
        )
        now = time.monotonic()
        jobs = [ClaimedJob.from_row(row, now) for row in rows]
        self._held.update((job.id, job.claim_token) for job in jobs)
        if entitled := [job for job in jobs if job.entitlement_id is not None]:
            await self._log_decisions(entitled)
        return jobs

    async def _log_decisions(self, entitled: list[ClaimedJob]) -> None:
        """The at-delivery entitlement decisions of claimed jobs. A failure to write them is logged
        and leaves the claim standing: the jobs are this worker's now, and must not wait for their
        leases to run out because the log could not be written."""
        try:
            await self.pool.execute(
                queries.LOG_DELIVERY_DECISIONS, [job.id for job in entitled], [job.denied for job in entitled]
            )
        except Exception as exc:
            log.warning(
                "worker %s could not log the entitlement decisions of %d job(s) (%s)",
                self.name,
                len(entitled),
                type(exc).__name__,
            )

    async def rescue(self) -> int:
        """Requeue (or end) attempts whose lease ran out. Returns how many were rescued."""
        rescued = await self.pool.fetch(
            queries.RESCUE_EXPIRED_LEASES, RESCUE_BATCH, UNKNOWN_OUTCOME, TARGET_INACTIVE, SENDING_WHEN_LOST
        )
        if rescued:
            log.warning("rescued %d attempt(s) whose worker stopped responding", len(rescued))
        return len(rescued)

    async def run_once(self) -> int:
        """Claim one batch, deliver it, and record it in one write. For tests and one-shot runs."""
        jobs = await self.claim(self.settings.worker_batch_size)
        outcomes: list[Outcome] = []

        async def attempt(job: ClaimedJob) -> None:
            delivery_progress.set(Progress.NOT_SENT)  # this task's own context
            if (done := await self.attempt(job)) is not None:
                outcomes.append(done)

        async with anyio.create_task_group() as deliveries:
            for job in jobs:
                deliveries.start_soon(attempt, job)
        await self._write(outcomes)
        return len(jobs)

    def _hold(self, claimed: list[ClaimedJob]) -> None:
        """Take claimed jobs on: start what the free slots allow, keep the rest ready."""
        if not claimed:
            return
        self._holding += len(claimed)
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        for job in claimed:
            if job.priority > 0:
                self._ready.appendleft(job)
            else:
                self._ready.append(job)
        self._job_ready.set()
        self._job_ready = anyio.Event()

    async def _deliver_ready(self) -> None:
        """One delivery slot: deliver ready jobs one after another until the worker stops.

        A slot per unit of concurrency rather than a task per job: spawning an anyio task
        (its handle, cancel scope and event) was a third of the worker's CPU per job (py-spy),
        and a slot that finds a job ready takes it without waiting on anything.
        """
        while not self._stopping:
            if not self._ready:
                await self._job_ready.wait()
                continue
            job = self._ready.popleft()
            if self._held.get(job.id) != job.claim_token:
                # Its lease was lost before it started (heartbeat): another worker may hold it.
                self._forget(1)
                continue
            if job.id in self._cancelled_before_start:
                self._cancelled_before_start.discard(job.id)
                # Released: no attempt was made, so none is counted and no receipt is written.
                self._finished(Outcome.release(job, "Cancelled before its delivery started.", NOT_STARTED_DELAY))
                continue
            self._sending += 1
            try:
                await self._process(job)
            finally:
                self._sending -= 1
            if self._claim_size():
                self._wake.set()

    def _release_unstarted(self) -> None:
        """Stopping: give the jobs claimed ahead back, uncounted, for another worker to claim now."""
        while self._ready:
            job = self._ready.popleft()
            self._finished(Outcome.release(job, "The worker stopped before starting it.", NOT_STARTED_DELAY))
        self._cancelled_before_start.clear()

    def _finished(self, done: Outcome) -> None:
        self._outcomes.append(done)
        self._outcome_added.set()

    def _released(self, outcomes: list[Outcome]) -> None:
        # Claims cannot outrun the writes: a crash leaves at most 2 * (concurrency + batch)
        # attempts unrecorded.
        self._forget(len(outcomes))

    def _forget(self, jobs: int) -> None:
        """``jobs`` claimed jobs are off this worker's hands: written, or no longer its own."""
        self._holding -= jobs
        if self._holding == 0:
            self._idle.set()
        if self._claim_size():
            self._wake.set()

    async def _process(self, job: ClaimedJob) -> None:
        progress = delivery_progress.set(Progress.NOT_SENT)
        try:
            with anyio.CancelScope() as scope:
                self._cancellable[job.id] = scope
                done = await self.attempt(job)
            if scope.cancelled_caught:  # its plan was cancelled: cancel_in_flight()
                error = f"Cancelled in flight: {delivery_progress.get().value}."
                done = self._judged(job, DeliveryResult(succeeded=False, error=error), delay=0.0)
        except anyio.get_cancelled_exc_class():
            # Past the shutdown grace: recorded as interrupted, and tried again only if the channel
            # can take it twice or it was not sent.
            interrupted = DeliveryResult(succeeded=False, retryable=True, error=INTERRUPTED)
            self._finished(self._judged(job, interrupted, delay=0.0))
            raise
        finally:
            self._cancellable.pop(job.id, None)
            delivery_progress.reset(progress)
        if done is None:
            self._forget(1)  # the claim was no longer this worker's: nothing sent, nothing to write
            return
        self._finished(done)

    def _judged(self, job: ClaimedJob, result: DeliveryResult, *, delay: float) -> Outcome:
        return Outcome.judged(job, result, self._resend_safety(job), delivery_progress.get(), delay=delay)

    def _resend_safety(self, job: ClaimedJob) -> ResendSafety:
        try:
            return self.runtime.adapters.get(job.channel_type).resend
        except DistributionError:
            return Adapter.resend  # an unknown channel: assume the worst

    def cancel_in_flight(self, job_id: UUID) -> bool:
        """Stop the delivery of a job whose plan was cancelled; it is recorded as cancelled."""
        scope = self._cancellable.get(job_id)
        if scope is None:
            if any(job.id == job_id for job in self._ready):
                self._cancelled_before_start.add(job_id)
                return True
            return False
        log.info("worker %s: job %s was cancelled; stopping its delivery", self.name, job_id)
        scope.cancel()
        return True

    def _on_cancel(self, payload: str) -> None:
        try:
            self.cancel_in_flight(UUID(payload))
        except ValueError:
            log.warning("ignoring a cancel notification with payload %r", payload)

    async def _flush_outcomes(self) -> None:
        """Write finished attempts until the worker stops and nothing is left to write."""
        try:
            await self._flush_until_stopped()
        finally:
            self._flushed.set()

    async def _flush_until_stopped(self) -> None:
        backoff = Backoff(self.settings.poll_interval, MAX_BACKOFF)
        give_up_at: float | None = None
        while self._delivering or self._outcomes:
            await self._outcome_added.wait()
            self._outcome_added = anyio.Event()
            while self._outcomes:
                batch, self._outcomes = self._outcomes, []
                try:
                    await self._write(batch)
                except TRANSIENT_ERRORS as exc:
                    self._outcomes[:0] = batch
                    if not self._delivering:
                        give_up_at = give_up_at or anyio.current_time() + self.settings.shutdown_grace
                        if anyio.current_time() >= give_up_at:
                            # The leases run out and rescue() requeues these attempts.
                            log.error("could not record %d attempt(s) before stopping (%s)", len(self._outcomes), exc)
                            self._released(self._outcomes)
                            self._outcomes = []
                            return
                    await self._database_trouble(exc, f"recording {len(batch)} attempt(s)")
                    await anyio.sleep(backoff.next())
                    continue
                backoff.reset()
                self._released(batch)

    async def _write(self, batch: list[Outcome]) -> None:
        """Record a batch; if it holds an outcome the database refuses, isolate that one.

        Every write is safe to repeat, so a transient error part-way through simply means the
        whole batch is written again.
        """
        try:
            await self.record_many(batch)
            return
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            if len(batch) == 1:
                return await self._write_unstorable(batch[0], exc)
            log.warning("recording %d attempt(s) failed (%s); recording them one at a time", len(batch), exc)
        for outcome in batch:
            try:
                await self.record_many([outcome])
            except TRANSIENT_ERRORS:
                raise
            except Exception as exc:
                await self._write_unstorable(outcome, exc)

    async def _write_unstorable(self, outcome: Outcome, exc: Exception) -> None:
        log.error(
            "the outcome of job %s attempt %d could not be stored (%s: %s); storing it without its details",
            outcome.job.id,
            outcome.job.attempt,
            type(exc).__name__,
            exc,
        )
        try:
            await self.record_many([outcome.unstorable(exc)])
        except TRANSIENT_ERRORS:
            raise
        except Exception:
            # Not retried: a poison outcome must not wedge the worker. Its lease runs out and
            # rescue() requeues the attempt with a receipt.
            log.exception("job %s attempt %d is left to lease expiry", outcome.job.id, outcome.job.attempt)

    async def attempt(self, job: ClaimedJob) -> Outcome | None:
        """Deliver one claimed job; never raises. None when the claim turned out not to be this
        worker's any more (a channel that cannot take a request twice checks just before sending):
        nothing was sent, and nothing is to be written. The caller starts its ``delivery_progress`` at
        NOT_SENT (``_process``)."""
        if job.denied is not None:
            return Outcome.unsent(job, ENTITLEMENT_GONE[job.denied])
        try:
            secrets = (
                self.runtime.secrets.decrypt(job.secret_ciphertext, bound_to=target_binding(job.target_id))
                if job.secret_ciphertext
                else {}
            )
        except DistributionError as exc:
            log.error(
                "worker %s cannot decrypt the secrets of target %s (%s); leaving job %s for a worker that can",
                self.name,
                job.target_name,
                exc.code,
                job.id,
            )
            return Outcome.release(
                job, f"{exc.code}: worker {self.name} could not decrypt the target's secrets. {exc.remediation}"
            )
        try:
            adapter = self.runtime.adapters.get(job.channel_type)
        except DistributionError as exc:
            return Outcome.unsent(job, f"{exc.code}: {exc.message}")
        safety = adapter.resend
        since = job.seconds_since_maybe_sent()
        if safety.key_lifetime is not None and since is not None and since > safety.key_lifetime - RESEND_MARGIN:
            return Outcome.unsent(job, RESEND_WINDOW_PASSED)
        if safety.resend_is_unsafe:
            try:
                cancelled = await self.pool.fetchval(queries.MARK_SENDING, job.id, job.claim_token)
            except Exception as exc:
                await self._database_trouble(exc, "marking an attempt as sending")
                return Outcome.release(job, "The database could not be reached before sending; nothing was sent.")
            if cancelled is None:
                log.warning("worker %s: job %s is no longer its own; not sending it", self.name, job.id)
                if self._held.get(job.id) == job.claim_token:
                    del self._held[job.id]  # nothing to renew: another claim holds it
                return None
            if cancelled:
                return Outcome.release(job, "Cancelled before its delivery started.", NOT_STARTED_DELAY)
        if job.attempt == 1 and since is None:  # the context's default: a first attempt
            result = await self._deliver(job, adapter, secrets)
        else:
            attempt = current_attempt.set(AttemptInfo(job.attempt, may_have_posted_before=since is not None))
            try:
                result = await self._deliver(job, adapter, secrets)
            finally:
                current_attempt.reset(attempt)
        return Outcome.judged(job, result, safety, delivery_progress.get())

    async def deliver(self, job: ClaimedJob) -> DeliveryResult:
        delivery_progress.set(Progress.NOT_SENT)
        done = await self.attempt(job)
        assert done is not None, "the claim was lost"
        return done.result

    async def _deliver(self, job: ClaimedJob, adapter: Adapter, secrets: dict[str, str]) -> DeliveryResult:
        used = [*secrets.values()]  # and what the adapter declares it came by (declare_secrets)
        declared = delivery_secrets.set(used)
        try:
            target = DeliveryTarget(
                id=job.target_id,
                name=job.target_name,
                config=job.config,
                secrets=secrets,
                private_addresses_allowed=job.private_addresses_allowed,
            )
            result = await adapter.deliver(job.payload, target, message_id=str(job.id))
        except DistributionError as exc:
            result = DeliveryResult(succeeded=False, error=f"{exc.code}: {exc.message}")
        except Exception as exc:
            # Exception texts can carry what an adapter was sending (h11 quotes a bad header's
            # value), so the traceback is scrubbed like a receipt before it is logged.
            trace = redaction.scrub("".join(traceback.format_exception(exc)), used)
            log.error("adapter %s crashed on job %s:\n%s", job.channel_type, job.id, trace)
            result = DeliveryResult(
                succeeded=False, retryable=True, error=f"The {job.channel_type} adapter failed: {type(exc).__name__}."
            )
        finally:
            delivery_secrets.reset(declared)
        return redact(result, used)

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
        """Write receipts and move the jobs on. Returns the new status by job id.

        One statement, or two in one transaction when the batch holds throttled attempts (their
        targets are suspended first). Safe to repeat: an attempt already recorded keeps its
        first receipt and moves nothing.
        """
        if not outcomes:
            return {}
        if conn is not None:
            statuses = await self._record(outcomes, conn)
        elif any(o.result.throttled for o in outcomes):
            async with self.pool.acquire() as acquired, transaction(acquired):
                statuses = await self._record(outcomes, acquired)
        else:
            statuses = await self._record(outcomes, self.pool)  # one statement: its own transaction
        for o in outcomes:
            if self._held.get(o.job.id) == o.job.claim_token:
                del self._held[o.job.id]  # recorded: no lease left to renew
        await self._after_record(outcomes)
        return statuses

    async def _record(self, outcomes: Sequence[Outcome], conn: asyncpg.Connection | asyncpg.Pool) -> dict[UUID, str]:
        until = await self._throttle_targets([o for o in outcomes if o.result.throttled], conn)
        rows = await conn.fetch(
            queries.RECORD_ATTEMPTS,
            [o.job.id for o in outcomes],
            [o.job.claim_token for o in outcomes],
            [o.job.attempt for o in outcomes],
            [o.result.succeeded for o in outcomes],
            [storable(o.result.external_url) for o in outcomes],
            [o.result.status_code for o in outcomes],
            [storable(o.result.error) for o in outcomes],
            [storable(o.result.raw_meta) for o in outcomes],
            [o.result.retryable for o in outcomes],
            [o.retry_delay for o in outcomes],
            [o.released for o in outcomes],
            # Columns that are null in most batches go as one null, which unnest pads with nulls:
            # encoding arrays of them cost a share of each job's CPU.
            [until.get(o.job.target_id) if o.result.throttled else None for o in outcomes] if until else None,
            # Only an attempt that failed is ever sent again; a success's row ends here.
            [o.maybe_sent for o in outcomes]
            if any(o.maybe_sent and not o.result.succeeded for o in outcomes)
            else None,
            [o.resend_window for o in outcomes] if any(o.resend_window is not None for o in outcomes) else None,
            TARGET_INACTIVE,
            float(self.settings.max_throttled_seconds),
            THROTTLED_TOO_LONG,
            RESEND_WINDOW_PASSED,
        )
        statuses = {row["id"]: row["status"] for row in rows}
        for o in outcomes:
            if not o.result.succeeded:
                log.info("job %s attempt %d -> %s: %s", o.job.id, o.job.attempt, statuses.get(o.job.id), o.result.error)
        return statuses

    async def _after_record(self, outcomes: Sequence[Outcome]) -> None:
        """What follows a batch once it is written, each in its own statement: a statement that
        holds jobs must never wait for a target, and these lock targets first.

        A target that answered 410 Gone is deactivated (its queued jobs fail). A success resets
        its target's 429 back-off. If either is lost (a crash), the next delivery to the target
        does it again.
        """
        if gone := sorted({o.job.target_id for o in outcomes if o.result.target_gone}):
            log.warning("target(s) %s answered 410 Gone; deactivating them", ", ".join(map(str, gone)))
            for target_id in gone:
                await self.pool.execute(queries.DEACTIVATE_GONE_TARGET, target_id, TARGET_GONE)
        reset = {o.job.target_id for o in outcomes if o.result.succeeded and o.job.target_backing_off}
        for target_id in sorted(reset - {o.job.target_id for o in outcomes if o.result.throttled}):
            await self.pool.execute(queries.RESET_TARGET_BACKOFF, target_id)

    async def _throttle_targets(
        self, throttled: list[Outcome], conn: asyncpg.Connection | asyncpg.Pool
    ) -> dict[UUID, datetime]:
        """Suspend the targets that throttled these attempts, one statement each in id order (the
        lock order); when each may be tried again."""
        now = datetime.now(UTC)
        asked: dict[UUID, tuple[float | None, bool]] = {}
        for o in throttled:
            named = max((o.result.throttled_until - now).total_seconds(), 0.0) if o.result.throttled_until else None
            longest, back_off = asked.get(o.job.target_id, (None, False))
            if named is not None:
                longest = named if longest is None else max(longest, named)
            asked[o.job.target_id] = (longest, back_off or named is None)
        until = {}
        for target_id in sorted(asked):
            seconds, back_off = asked[target_id]
            until[target_id] = when = await conn.fetchval(
                queries.THROTTLE_TARGET, target_id, seconds, back_off, MAX_THROTTLE_BACKOFF
            )
            log.warning("target %s throttled deliveries; suspended until %s", target_id, when.isoformat())
        return until


def storable(value: Any) -> Any:
    """``value`` (a string, or JSON-like data) with what PostgreSQL cannot store replaced by U+FFFD."""
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, Mapping):
        return {storable(str(key)): storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [storable(item) for item in value]
    return value


def redact(result: DeliveryResult, secrets: Iterable[str]) -> DeliveryResult:
    """Blank any secret (or fragment of one) an adapter or a server echoed into what gets stored."""
    values = [secret for secret in secrets if secret]
    if not values:
        return result
    # One pass: the fragments of every secret are worked out once for all three fields.
    error, external_url, raw_meta = redaction.scrub([result.error, result.external_url, result.raw_meta], values)
    return replace(result, error=error, external_url=external_url, raw_meta=raw_meta)
