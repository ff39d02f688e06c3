"""An attempt is owned by one claim: every claim gets its own token, and every write about the
attempt (its outcome, a lease renewal, a release, a rescue) names it, so a write from an earlier
claim, repeated or late, never moves a later one. (A claim lost to a server crash is in
tests/test_chaos.py, on a PostgreSQL cluster the test owns.)"""

from __future__ import annotations

import threading
from dataclasses import replace
from uuid import UUID

import anyio
import asyncpg
import pytest

from queue_worker.worker import Outcome, Worker
from tests.helpers import eventually, publish
from wordclaw_mcp import queries
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import PlanRef
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


async def holder(db: asyncpg.Connection, job_id: UUID) -> asyncpg.Record:
    return await db.fetchrow(
        "SELECT status, attempt, claim_token, locked_by FROM distribution_jobs WHERE id = $1", job_id
    )


async def test_every_claim_gets_a_token_of_its_own_and_a_finished_job_keeps_none(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    first, second = Worker(runtime, name="first"), Worker(runtime, name="second")
    await publish(service, [receiver.url, receiver.url + "?b"])
    [one] = await first.claim(1)
    [other] = await second.claim(1)
    assert None not in {one.claim_token, other.claim_token} and one.claim_token != other.claim_token
    for job in (one, other):
        assert (await holder(db, job.id))["claim_token"] == job.claim_token
    await first.record_many([Outcome.release(one, "not started", 0.0)])
    [again] = await first.claim(1)
    assert again.id == one.id and again.claim_token not in {one.claim_token, other.claim_token}
    await first.record_many([await first.attempt(again)])
    await second.record_many([await second.attempt(other)])
    assert await db.fetchval("SELECT count(*) FROM distribution_jobs WHERE claim_token IS NOT NULL") == 0


async def test_a_release_written_twice_does_not_requeue_a_job_another_worker_now_holds(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    """The flusher repeats a batch whose commit acknowledgement was lost: the repeat must find the
    job claimed by someone else and leave it alone."""
    first, second = Worker(runtime, name="first"), Worker(runtime, name="second")
    plan, _ = await publish(service, [receiver.url])
    [mine] = await first.claim(1)
    released = Outcome.release(mine, "The worker stopped before starting it.", 0.0)
    assert await first.record_many([released]) == {mine.id: "queued"}
    [theirs] = await second.claim(1)
    assert theirs.attempt == mine.attempt, "a release made no attempt: its number is the next one's"
    assert theirs.claim_token != mine.claim_token

    assert await first.record_many([released]) == {}, "the repeat moved a job another worker holds"
    row = await holder(db, theirs.id)
    assert (row["status"], row["claim_token"], row["locked_by"]) == ("running", theirs.claim_token, "second")
    assert await second.heartbeat() == set() and await second.heartbeat() == set(), "its lease is still its own"
    assert await second.record(theirs, await second.deliver(theirs)) == "succeeded"
    receipts = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert [(r.attempt, r.succeeded) for r in receipts] == [(1, True)]


async def test_a_late_result_of_an_earlier_claim_never_moves_the_claim_that_holds_the_job(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    """Whatever the attempt numbers say: the token decides."""
    first, second = Worker(runtime, name="first"), Worker(runtime, name="second")
    await publish(service, [receiver.url])
    [stale] = await first.claim(1)
    await db.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 second'")
    assert await second.rescue() == 1
    [fresh] = await second.claim(1)
    # Even an outcome that claims the current attempt number moves nothing without the token.
    impostor = replace(stale, attempt=fresh.attempt)
    receiver.behaviour.status = 500
    assert await first.record(impostor, await first.deliver(impostor)) is None
    row = await holder(db, fresh.id)
    assert (row["status"], row["attempt"], row["claim_token"]) == ("running", fresh.attempt, fresh.claim_token)


async def test_a_job_claimed_ahead_whose_lease_was_found_lost_is_never_delivered(
    settings: Settings, receiver: WebhookReceiver
) -> None:
    """One delivery slot, two jobs claimed: the second waits, ready. Both leases run out and are
    rescued meanwhile; once the heartbeat finds them lost, the waiting one must not go out."""
    gate = threading.Event()
    receiver.behaviour.gate = gate
    async with Runtime.open(replace(settings, worker_concurrency=1, worker_batch_size=2)) as runtime:
        service = DistributionService(runtime)
        await publish(service, [receiver.url + "?first", receiver.url + "?second"])
        worker = Worker(runtime, name="slow")
        async with runtime.pool.acquire() as db, anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await anyio.to_thread.run_sync(receiver.wait_for, 1, 10)  # one delivery held at the gate
            assert len(worker._ready) == 1
            # Both leases run out and another worker rescues them, in one transaction (the slow
            # worker's heartbeat cannot renew them in between), out of reach for an hour.
            async with db.transaction():
                await db.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 second'")
                rescued = await db.fetch(queries.RESCUE_EXPIRED_LEASES, 10, "rescued", "inactive", "unknown")
                await db.execute("UPDATE distribution_jobs SET next_attempt_at = now() + interval '1 hour'")
            assert len(rescued) == 2
            await worker.heartbeat()
            assert len(await worker.heartbeat()) == 2, "two renewals missed both"
            gate.set()  # the first delivery ends; its slot is free for the next ready job, if any
            await eventually(lambda: _idle(worker), within=10)
            worker.stop()
    assert [request.path.rpartition("?")[2] for request in receiver.requests] == ["first"]


async def _idle(worker: Worker) -> bool:
    return worker._holding == 0
