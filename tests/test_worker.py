"""The worker under trouble: cancels mid-attempt, poison outcomes, repeated writes, database
errors, low concurrency, deactivated targets and the wrong secret key. Real PostgreSQL, real
HTTP receivers."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import anyio
import asyncpg
import pytest
from cryptography.fernet import Fernet

from queue_worker.adapters import DeliveryResult
from queue_worker.worker import INTERRUPTED, Outcome, Worker
from tests.helpers import (
    database_name,
    eventually,
    new_signing_secret,
    publish,
    terminate_backends,
    terminate_lock_waiters,
)
from wordclaw_mcp.config import Settings
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import Plan, PlanRef
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


def tuned(runtime: Runtime, **settings: object) -> Runtime:
    """The same pool and adapters under other worker settings."""
    return replace(runtime, settings=replace(runtime.settings, **settings))


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    """The worker daemon in the background; stopped, and awaited, on the way out."""
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            try:
                yield worker
            finally:
                worker.stop()


async def plan_of(service: DistributionService, plan_id: UUID) -> Plan:
    return await service.get_plan(PlanRef(plan_id=plan_id))


async def receipts_of(service: DistributionService, plan_id: UUID) -> list[tuple[int, bool]]:
    return [(r.attempt, r.succeeded) for r in (await service.get_receipts(PlanRef(plan_id=plan_id))).receipts]


# --- a cancel that sticks ----------------------------------------------------------------------


async def test_a_running_job_that_fails_after_a_cancel_ends_cancelled_and_is_never_retried(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    receiver.behaviour.status = 503
    plan, _ = await publish(service, [receiver.url])
    [job] = await worker.claim(1)
    cancelled = await service.cancel_plan(PlanRef(plan_id=plan.id))
    assert cancelled.cancel_requested_at is not None
    assert [j.status for j in cancelled.jobs] == ["running"]

    assert await worker.record(job, await worker.deliver(job)) == "cancelled"
    done = await plan_of(service, plan.id)
    assert (done.status, done.jobs[0].status) == ("cancelled", "cancelled")
    assert await receipts_of(service, plan.id) == [(1, False)]
    assert await worker.run_once() == 0
    assert len(receiver.requests) == 1


async def test_a_running_job_that_succeeds_after_a_cancel_stays_succeeded(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    plan, _ = await publish(service, [receiver.url, receiver.url + "?b"])
    [job] = await worker.claim(1)
    cancelled = await service.cancel_plan(PlanRef(plan_id=plan.id))
    assert sorted(j.status for j in cancelled.jobs) == ["cancelled", "running"]

    assert await worker.record(job, await worker.deliver(job)) == "succeeded"
    done = await plan_of(service, plan.id)
    assert done.status == "partial"
    assert sorted(j.status for j in done.jobs) == ["cancelled", "succeeded"]
    assert await worker.run_once() == 0


async def test_a_cancelled_attempt_whose_lease_runs_out_ends_cancelled(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    plan, _ = await publish(service, [receiver.url])
    await worker.claim(1)
    await service.cancel_plan(PlanRef(plan_id=plan.id))
    await db.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 second'")
    assert await worker.rescue() == 1
    done = await plan_of(service, plan.id)
    assert (done.status, done.jobs[0].status) == ("cancelled", "cancelled")
    assert await worker.run_once() == 0


async def test_a_cancelled_attempt_interrupted_by_shutdown_ends_cancelled(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    receiver.behaviour.hang = True
    plan, _ = await publish(service, [receiver.url])
    worker._on_cancel = lambda _payload: None  # so the shutdown, not the cancel, ends the attempt
    async with running(worker):
        await anyio.to_thread.run_sync(receiver.wait_for, 1)
        await service.cancel_plan(PlanRef(plan_id=plan.id))
    done = await plan_of(service, plan.id)
    assert (done.status, done.jobs[0].status) == ("cancelled", "cancelled")
    receipt = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts[0]
    assert receipt.error_message == INTERRUPTED


# --- one receipt per attempt -------------------------------------------------------------------


async def test_a_batch_written_twice_leaves_one_receipt_per_attempt(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    """As when a commit succeeds but its acknowledgement is lost and the worker writes again."""
    with WebhookReceiver() as failing:
        failing.behaviour.status = 503
        plan, _ = await publish(service, [receiver.url, failing.url])
        jobs = await worker.claim(2)
        outcomes = [await worker.attempt(job) for job in jobs]
        first = await worker.record_many(outcomes)
        assert sorted(first.values()) == ["queued", "succeeded"]
        assert await worker.record_many(outcomes) == {}, "a repeated write moves nothing"
    assert sorted(await receipts_of(service, plan.id)) == [(1, False), (1, True)]
    assert sorted(j.status for j in (await plan_of(service, plan.id)).jobs) == ["queued", "succeeded"]
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            "INSERT INTO distribution_receipts (job_id, attempt, succeeded) VALUES ($1, 1, true)", jobs[0].id
        )


async def test_a_late_success_after_a_rescue_ends_the_job_succeeded_and_is_not_sent_again(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    plan, _ = await publish(service, [receiver.url])
    [stale] = await worker.claim(1)  # this worker then stops answering without recording anything
    assert await worker.rescue() == 0, "a live lease is left alone"
    await db.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 second'")
    assert await worker.rescue() == 1
    [lost] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert (lost.attempt, lost.succeeded) == (1, False) and "stopped responding" in lost.error_message
    assert (await plan_of(service, plan.id)).jobs[0].status == "queued"

    # Its answer arrives after all: the content was delivered, so the job is done.
    assert await worker.record(stale, await worker.deliver(stale)) == "succeeded"
    done = await plan_of(service, plan.id)
    assert (done.status, done.jobs[0].status, done.jobs[0].attempt) == ("succeeded", "succeeded", 1)
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert (receipt.attempt, receipt.succeeded, receipt.status_code) == (1, True, 200)
    assert await worker.run_once() == 0
    assert len(receiver.requests) == 1


async def test_a_late_failure_after_a_rescue_keeps_the_first_receipt_and_cannot_overwrite_the_next_attempt(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    plan, _ = await publish(service, [receiver.url])
    [stale] = await worker.claim(1)
    await db.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 second'")
    assert await worker.rescue() == 1
    [second] = await worker.claim(1)
    assert second.attempt == 2

    late = DeliveryResult(succeeded=False, status_code=503, error="late", retryable=True)
    assert await worker.record(stale, late) is None
    job = (await plan_of(service, plan.id)).jobs[0]
    assert (job.status, job.attempt) == ("running", 2)
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert "stopped responding" in receipt.error_message

    assert await worker.record(second, await worker.deliver(second)) == "succeeded"
    assert await receipts_of(service, plan.id) == [(1, False), (2, True)]


# --- poison outcomes ---------------------------------------------------------------------------


async def test_text_postgresql_cannot_store_is_replaced_in_receipts(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    receiver.behaviour.status = 400
    receiver.behaviour.body = b'{"error":"bad\x00byte"}'
    plan, _ = await publish(service, [receiver.url])
    assert await worker.run_once() == 1
    done = await plan_of(service, plan.id)
    assert done.jobs[0].status == "failed"
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.raw_meta["responseBody"] == '{"error":"bad\ufffdbyte"}'

    unstorable = DeliveryResult(
        succeeded=False, error="lone \ud800 and \x00", raw_meta={"k\x00": ["\udfff"]}, retryable=False
    )
    plan, _ = await publish(service, [receiver.url])
    [job] = await worker.claim(1)
    assert await worker.record(job, unstorable) == "failed"
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert (receipt.error_message, receipt.raw_meta) == ("lone \ufffd and \ufffd", {"k\ufffd": ["\ufffd"]})


async def test_an_outcome_the_database_refuses_is_isolated_from_the_rest_of_its_batch(
    service: DistributionService, worker: Worker, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()
    with WebhookReceiver() as receiver:
        receiver.behaviour.gate = gate
        kept, _ = await publish(service, [receiver.url])
        doomed, _ = await publish(service, [receiver.url + "?doomed"])
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run_once)  # one claim, one batch write of both outcomes
            await anyio.to_thread.run_sync(receiver.wait_for, 2)
            # Its job disappears mid-attempt, so its receipt breaks the batch's foreign key.
            await db.execute("DELETE FROM distribution_plans WHERE id = $1", doomed.id)
            gate.set()
    done = await plan_of(service, kept.id)
    assert (done.status, done.jobs[0].status) == ("succeeded", "succeeded")
    assert await receipts_of(service, kept.id) == [(1, True)]
    assert "recording them one at a time" in caplog.text
    assert "is left to lease expiry" in caplog.text


async def test_a_success_whose_details_cannot_be_stored_is_still_recorded(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    plan, _ = await publish(service, [receiver.url])
    [job] = await worker.claim(1)
    # NaN is valid to Python's json but not to jsonb: the details are refused, the outcome is not.
    poisoned = Outcome(job, DeliveryResult(succeeded=True, status_code=200, raw_meta={"x": float("nan")}), 0.0)
    await worker._write([poisoned])
    done = await plan_of(service, plan.id)
    assert done.jobs[0].status == "succeeded"
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.succeeded and receipt.raw_meta == {}
    assert receipt.error_message.startswith("The attempt succeeded, but its details could not be stored")


# --- the flusher and the claim loop under database trouble ---------------------------------------


async def test_the_flusher_writes_again_after_losing_its_connection(
    runtime: Runtime, service: DistributionService, worker: Worker, postgres_server_url: str, caplog
) -> None:
    gate = threading.Event()
    blocker = await asyncpg.connect(runtime.settings.database_url)
    try:
        with WebhookReceiver() as receiver:
            receiver.behaviour.gate = gate
            plan, _ = await publish(service, [receiver.url])
            async with running(worker):
                await anyio.to_thread.run_sync(receiver.wait_for, 1)
                async with blocker.transaction():
                    # The outcome's write waits on this row lock, and its connection dies mid-statement.
                    await blocker.execute("SELECT 1 FROM distribution_jobs WHERE plan_id = $1 FOR UPDATE", plan.id)
                    gate.set()
                    await terminate_lock_waiters(postgres_server_url, database_name(runtime.settings.database_url))
                done = await eventually(lambda: _final(service, plan.id), within=20)
    finally:
        await blocker.close()
    assert done.jobs[0].status == "succeeded"
    assert await receipts_of(service, plan.id) == [(1, True)]
    assert "lost the database while recording 1 attempt(s)" in caplog.text


async def _final(service: DistributionService, plan_id: UUID) -> Plan | None:
    try:
        plan = await plan_of(service, plan_id)
    except DistributionError:
        return None
    return plan if plan.status in {"succeeded", "partial", "failed", "cancelled"} else None


async def test_the_worker_rides_out_a_read_only_database_keeping_its_in_flight_work(
    runtime: Runtime, settings: Settings, worker: Worker, postgres_server_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A failover: the connections drop and the server that answers is read-only for a while."""
    database = database_name(settings.database_url)
    admin = await asyncpg.connect(postgres_server_url)
    gate = threading.Event()
    try:
        # The agent's side is another process, with its own connections.
        async with Runtime.open(settings) as elsewhere, running(worker):
            service = DistributionService(elsewhere)
            with WebhookReceiver() as receiver:
                receiver.behaviour.gate = gate
                plan, _ = await publish(service, [receiver.url])
                await anyio.to_thread.run_sync(receiver.wait_for, 1)
                await admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
                await terminate_backends(postgres_server_url, database)
                gate.set()  # the answer arrives while every write is refused
                # Both the flusher and the claim loop meet the refusal, and both carry on.
                await eventually(lambda: _true("refused recording 1 attempt(s)" in caplog.text), within=20)
                await eventually(lambda: _true("refused claiming jobs" in caplog.text), within=20)
                assert await _job_status(settings, plan.id) == "running"
                await admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
                await elsewhere.pool.expire_connections()
                done = await eventually(lambda: _final(service, plan.id), within=30)
                assert done.jobs[0].status == "succeeded"
                assert await receipts_of(service, plan.id) == [(1, True)]
                later, _ = await publish(service, [receiver.url + "?later"])
                assert (await eventually(lambda: _final(service, later.id), within=30)).status == "succeeded"
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        await admin.close()


async def _job_status(settings: Settings, plan_id: UUID) -> str:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetchval("SELECT status FROM distribution_jobs WHERE plan_id = $1", plan_id)
    finally:
        await conn.close()


async def _true(value: bool) -> bool:
    return value


# --- claims sized from the free slots ----------------------------------------------------------


async def test_with_low_concurrency_a_fast_job_is_not_held_behind_a_slow_one(
    runtime: Runtime, service: DistributionService
) -> None:
    worker = Worker(tuned(runtime, worker_concurrency=4))
    gate = threading.Event()
    with WebhookReceiver() as slow, WebhookReceiver() as fast:
        slow.behaviour.gate = gate
        slow_plan, _ = await publish(service, [slow.url])
        try:
            async with running(worker):
                await anyio.to_thread.run_sync(slow.wait_for, 1)
                fast_plan, _ = await publish(service, [fast.url])
                # Well inside the slow delivery's 5 s timeout, after which a lockstep loop would claim.
                done = await service.await_plan(fast_plan.id, 3)
                assert done.status == "succeeded", "the fast job waited for the slow one"
                assert (await plan_of(service, slow_plan.id)).status == "running"
                gate.set()
        finally:
            gate.set()


# --- jobs claimed ahead ------------------------------------------------------------------------


async def two_plans_one_slot_busy(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver
) -> tuple[Worker, list[Plan]]:
    """Two queued plans to a gated receiver, and a worker with one slot that will claim both at once."""
    plans = [(await publish(service, [receiver.url]))[0] for _ in range(2)]
    return Worker(tuned(runtime, worker_concurrency=1, worker_batch_size=2)), plans


async def test_a_job_claimed_ahead_whose_plan_is_cancelled_is_neither_sent_nor_counted(
    runtime: Runtime, service: DistributionService
) -> None:
    gate = threading.Event()
    with WebhookReceiver() as receiver:
        receiver.behaviour.gate = gate
        worker, _plans = await two_plans_one_slot_busy(runtime, service, receiver)
        try:
            async with running(worker):
                await anyio.to_thread.run_sync(receiver.wait_for, 1)
                [waiting] = list(worker._ready)  # the slot is busy with the other job
                await service.cancel_plan(PlanRef(plan_id=waiting.plan_id))
                await eventually(lambda: _true(waiting.id in worker._cancelled_before_start))
                gate.set()
                done = await eventually(lambda: _ended(service, waiting.plan_id))
        finally:
            gate.set()
    assert done.status == "cancelled"
    assert done.jobs[0].attempt == 0, "no attempt was made, so none is counted"
    assert await receipts_of(service, waiting.plan_id) == []
    assert len(receiver.requests) == 1


async def test_a_stopping_worker_gives_back_the_jobs_it_claimed_ahead_at_once_and_uncounted(
    runtime: Runtime, service: DistributionService
) -> None:
    gate = threading.Event()
    with WebhookReceiver() as receiver:
        receiver.behaviour.gate = gate
        worker, _plans = await two_plans_one_slot_busy(runtime, service, receiver)
        try:
            async with running(worker):
                await anyio.to_thread.run_sync(receiver.wait_for, 1)
                [waiting] = list(worker._ready)
                worker.stop()
                # Given back while the other delivery still hangs: nothing waits for the grace.
                job = await eventually(lambda: _queued_job(service, waiting.plan_id))
                gate.set()
        finally:
            gate.set()
    assert job.attempt == 0 and job.next_attempt_at <= datetime.now(UTC)
    assert await receipts_of(service, waiting.plan_id) == []
    assert len(receiver.requests) == 1


async def _ended(service: DistributionService, plan_id: UUID) -> Plan | None:
    plan = await plan_of(service, plan_id)
    return plan if plan.status not in ("queued", "running") else None


async def _queued_job(service: DistributionService, plan_id: UUID):
    [job] = (await plan_of(service, plan_id)).jobs
    return job if job.status == "queued" else None


# --- deactivated targets -----------------------------------------------------------------------


async def test_deactivating_a_target_fails_its_queued_jobs_so_the_plan_ends(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    plan, target_ids = await publish(service, [receiver.url, receiver.url + "?gone"])
    await db.execute("UPDATE distribution_targets SET active = false WHERE id = $1", target_ids[1])
    assert await worker.run_once() == 1
    done = await plan_of(service, plan.id)
    assert done.status == "partial"
    gone = next(job for job in done.jobs if job.target_id == target_ids[1])
    assert gone.status == "failed" and gone.last_error.startswith("TARGET_INACTIVE")


async def test_a_running_job_whose_target_is_deactivated_fails_instead_of_retrying(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    receiver.behaviour.status = 503
    plan, target_ids = await publish(service, [receiver.url])
    [job] = await worker.claim(1)
    await db.execute("UPDATE distribution_targets SET active = false WHERE id = $1", target_ids[0])
    assert await worker.record(job, await worker.deliver(job)) == "failed"
    done = await plan_of(service, plan.id)
    assert done.status == "failed" and done.jobs[0].last_error.startswith("TARGET_INACTIVE")


# --- the wrong secret key ----------------------------------------------------------------------


@pytest.fixture
async def wrong_key_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with Runtime.open(replace(settings, secret_keys=(Fernet.generate_key().decode(),))) as opened:
        yield opened


async def test_a_worker_with_the_wrong_key_leaves_jobs_for_one_that_has_it(
    service: DistributionService,
    worker: Worker,
    wrong_key_runtime: Runtime,
    receiver: WebhookReceiver,
    db: asyncpg.Connection,
) -> None:
    plan, _ = await publish(service, [receiver.url], secret=new_signing_secret())
    before = datetime.now(UTC)
    assert await Worker(wrong_key_runtime).run_once() == 1
    job = (await plan_of(service, plan.id)).jobs[0]
    assert (job.status, job.attempt) == ("queued", 0), "nothing was sent, so nothing is counted"
    assert job.last_error.startswith("SECRET_KEY_MISMATCH")
    assert job.next_attempt_at >= before + timedelta(seconds=30)
    assert await receipts_of(service, plan.id) == []
    assert receiver.requests == []

    await db.execute("UPDATE distribution_jobs SET next_attempt_at = now() WHERE plan_id = $1", plan.id)
    assert await worker.run_once() == 1
    done = await plan_of(service, plan.id)
    assert (done.status, done.jobs[0].attempt) == ("succeeded", 1)


async def test_a_worker_that_cannot_decrypt_every_stored_secret_refuses_to_start(
    service: DistributionService, worker: Worker, wrong_key_runtime: Runtime, receiver: WebhookReceiver
) -> None:
    await Worker(wrong_key_runtime).check_secret_keys()  # nothing stored yet: nothing to refuse
    await publish(service, [receiver.url], secret=new_signing_secret())
    await worker.check_secret_keys()
    with pytest.raises(DistributionError) as refused:
        await Worker(wrong_key_runtime).check_secret_keys()
    assert refused.value.code == "SECRET_KEY_MISMATCH"
    assert "WORDCLAW_SECRET_KEYS" in refused.value.remediation

    # One secret it cannot read among others it can is refused too, rather than found at delivery.
    _, [unreadable] = await publish(DistributionService(wrong_key_runtime), [receiver.url])
    with pytest.raises(DistributionError) as refused:
        await worker.check_secret_keys()
    assert refused.value.code == "SECRET_KEY_MISMATCH"
    [name] = [target.name for target in (await service.list_targets()).targets if target.id == unreadable]
    assert refused.value.message.startswith("1 stored secret(s) cannot be decrypted")
    assert repr(name) in refused.value.message

    env = {key: value for key, value in os.environ.items() if not key.startswith("WORDCLAW_")}
    env |= {
        "WORDCLAW_DATABASE_URL": wrong_key_runtime.settings.database_url,
        "WORDCLAW_SECRET_KEYS": wrong_key_runtime.settings.secret_keys[0],
        "WORDCLAW_HOME": str(wrong_key_runtime.settings.home),
    }
    with anyio.fail_after(60):
        process = await anyio.run_process([str(Path(sys.executable).parent / "wordclaw-worker")], env=env, check=False)
    assert process.returncode == 2
    lines = process.stderr.decode().strip().splitlines()
    assert lines[-1].startswith("wordclaw-worker: SECRET_KEY_MISMATCH: "), lines
    assert "Traceback" not in process.stderr.decode()


# --- settings a worker cannot honour -----------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"delivery_timeout": 61.0, "lease_seconds": 120},
        {"delivery_timeout": 0.0},
        {"worker_concurrency": 0},
        {"worker_batch_size": 0},
    ],
)
def test_settings_a_worker_cannot_honour_are_refused(values: dict) -> None:
    with pytest.raises(DistributionError) as refused:
        Settings(**values)
    assert refused.value.code == "INVALID_SETTINGS" and refused.value.remediation
