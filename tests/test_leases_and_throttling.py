"""Leases renewed by heartbeats, the workers table, and throttling that spends no attempts.
Real PostgreSQL, real HTTP receivers, a real worker process where a process matters."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from uuid import UUID

import anyio
import asyncpg
import pytest
from mcp import Client, StdioServerParameters

from queue_worker.worker import THROTTLED_TOO_LONG, Worker
from tests.helpers import call, eventually, publish, waiting_for_a_lock
from tests.test_processes import BIN, _final, external_database_env, worker_process
from tests.test_worker import plan_of, running, tuned
from wordclaw_mcp import queries, ratelimit
from wordclaw_mcp.models import CreateDistributionPlanInput, PlanRef, RegisterTargetInput, UpsertContentItemInput
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


# --- heartbeats and leases ---------------------------------------------------------------------


async def lease_of(db: asyncpg.Connection, plan_id: UUID) -> datetime | None:
    return await db.fetchval("SELECT lease_expires_at FROM distribution_jobs WHERE plan_id = $1", plan_id)


async def test_a_worker_registers_renews_the_leases_it_holds_and_deregisters_on_a_clean_stop(
    runtime: Runtime, service: DistributionService, db: asyncpg.Connection
) -> None:
    # Heartbeats every 3 s; the held answer would time the delivery out at 4.5 s.
    worker = Worker(tuned(runtime, lease_seconds=9.0, delivery_timeout=4.5))
    gate = threading.Event()
    with WebhookReceiver() as receiver:
        receiver.behaviour.gate = gate
        plan, _ = await publish(service, [receiver.url])
        async with running(worker):
            await anyio.to_thread.run_sync(receiver.wait_for, 1)
            first = await lease_of(db, plan.id)
            row = await db.fetchrow("SELECT * FROM workers WHERE name = $1", worker.name)
            assert row is not None and (row["pid"], row["concurrency"]) > (0, 0)
            renewed = await eventually(lambda: _later(db, plan.id, first), within=4)
            assert renewed > first
            gate.set()
    assert await db.fetchval("SELECT count(*) FROM workers") == 0


async def _later(db: asyncpg.Connection, plan_id: UUID, than: datetime) -> datetime | None:
    lease = await lease_of(db, plan_id)
    return lease if lease is not None and lease > than else None


async def test_a_worker_that_lost_a_lease_stops_renewing_it_and_its_late_result_moves_nothing(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    slow, fast = Worker(runtime, name="slow"), Worker(runtime, name="fast")
    plan, _ = await publish(service, [receiver.url])
    [stale] = await slow.claim(1)
    assert await slow.heartbeat() == set()
    await db.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 second'")
    assert await fast.rescue() == 1
    [fresh] = await fast.claim(1)
    assert fresh.attempt == 2

    assert await slow.heartbeat() == set(), "missed once: it may be an outcome being written"
    assert await slow.heartbeat() == {stale.id}, "missed twice: the renewal touched fewer rows than it holds"
    assert await slow.heartbeat() == set(), "a lost lease is not renewed again"
    before = await lease_of(db, plan.id)
    assert await fast.heartbeat() == set()
    assert await lease_of(db, plan.id) >= before

    receiver.behaviour.status = 503
    assert await slow.record(stale, await slow.deliver(stale)) is None
    job = (await plan_of(service, plan.id)).jobs[0]
    assert (job.status, job.attempt) == ("running", 2)


async def test_a_killed_workers_job_is_claimed_again_within_the_lease_and_five_seconds(
    database_url: str, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    env = external_database_env(database_url, tmp_path) | {
        "WORDCLAW_LEASE_SECONDS": "4",
        "WORDCLAW_DELIVERY_TIMEOUT": "2",
    }
    gate = threading.Event()
    receiver.behaviour.gate = gate
    params = StdioServerParameters(command=str(BIN / "wordclaw-mcp"), args=["--no-worker"], env=env)
    async with Client(params) as client:
        item = await call(client, "upsert_content_item", title="Rescued", body="b")
        target = await call(client, "register_target", name="hook", channelType="webhook", config={"url": receiver.url})
        async with worker_process(env, tmp_path / "doomed.log") as doomed:
            plan = await call(client, "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"]])
            await anyio.to_thread.run_sync(receiver.wait_for, 1)  # the attempt is in flight
            async with worker_process(env, tmp_path / "rescuer.log"):
                doomed.kill()  # SIGKILL: no chance to record anything
                killed_at = time.monotonic()
                gate.set()  # the rescuer's attempt is answered at once
                await anyio.to_thread.run_sync(receiver.wait_for, 2, 20)
                taken_after = time.monotonic() - killed_at
                done = await eventually(lambda: _final(client, plan["id"]), within=20)
        receipts = (await call(client, "get_receipts", planId=plan["id"]))["receipts"]
    print(f"claimed again {taken_after:.1f} s after the kill (lease 4 s)")
    assert taken_after <= 4 + 5
    assert done["status"] == "succeeded" and done["jobs"][0]["attempt"] == 2
    assert [(r["attempt"], r["succeeded"]) for r in receipts] == [(1, False), (2, True)]


# --- throttling --------------------------------------------------------------------------------


async def test_a_throttled_target_waits_out_retry_after_without_spending_attempts_while_others_flow(
    service: DistributionService, worker: Worker, db: asyncpg.Connection
) -> None:
    with WebhookReceiver() as throttled, WebhookReceiver() as other:
        throttled.behaviour.status = 429
        throttled.behaviour.headers = {"retry-after": "2"}
        plan, target_ids = await publish(service, [throttled.url, other.url])
        await db.execute("UPDATE distribution_jobs SET max_attempts = 1 WHERE plan_id = $1", plan.id)
        async with running(worker):
            await anyio.to_thread.run_sync(throttled.wait_for, 1)
            first_try = time.monotonic()
            throttled.behaviour.status = 200
            await anyio.to_thread.run_sync(other.wait_for, 1)
            other_done = time.monotonic()
            await anyio.to_thread.run_sync(throttled.wait_for, 2, 15)
            second_try = time.monotonic()
            done = await service.await_plan(plan.id, 10)
    assert other_done - first_try < 2, "the other target was held up"
    assert second_try - first_try >= 1.9, "Retry-After was not waited out"
    assert done.status == "succeeded", "a throttled attempt spent the only attempt"
    job = next(j for j in done.jobs if j.target_id == target_ids[0])
    assert job.attempt == 2
    assert await db.fetchval("SELECT throttles FROM distribution_jobs WHERE id = $1", job.id) == 1
    events = await db.fetch("SELECT event_type FROM distribution_events WHERE job_id = $1 ORDER BY id", job.id)
    assert "distribution.job.throttled" in [row["event_type"] for row in events]


async def test_a_429_without_retry_after_backs_off_growing_and_a_success_resets_it(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    receiver.behaviour.status = 429
    plan, [target_id] = await publish(service, [receiver.url])
    backoffs = []
    for _ in range(3):
        [job] = await worker.claim(1)
        before = datetime.now(UTC)
        assert await worker.record(job, await worker.deliver(job)) == "queued"
        target = await db.fetchrow("SELECT * FROM distribution_targets WHERE id = $1", target_id)
        backoffs.append(target["throttle_backoff_seconds"])
        assert target["suspended_until"] >= before + timedelta(seconds=backoffs[-1] - 0.5)
        queued = await db.fetchrow("SELECT * FROM distribution_jobs WHERE id = $1", job.id)
        assert queued["next_attempt_at"] == target["suspended_until"]
        assert await worker.claim(1) == [], "the suspended target is skipped"
        await db.execute("UPDATE distribution_targets SET suspended_until = NULL WHERE id = $1", target_id)
        await db.execute("UPDATE distribution_jobs SET next_attempt_at = now() WHERE id = $1", job.id)
    assert backoffs == [1.0, 2.0, 4.0]
    receiver.behaviour.status = 200
    assert await worker.run_once() == 1
    assert (
        await db.fetchval("SELECT throttle_backoff_seconds FROM distribution_targets WHERE id = $1", target_id) is None
    )
    assert (await plan_of(service, plan.id)).status == "succeeded"


async def test_an_exhausted_rate_limit_suspends_the_target_after_a_success(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    reset = datetime.now(UTC) + timedelta(seconds=60)
    receiver.behaviour.headers = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(reset.timestamp()))}
    _first, [target_id] = await publish(service, [receiver.url])
    second, _ = await publish(service, [receiver.url])
    # The second plan's job goes to the same target as the first's.
    await db.execute("UPDATE distribution_jobs SET target_id = $1 WHERE plan_id = $2", target_id, second.id)
    [job] = await worker.claim(1)
    assert await worker.record(job, await worker.deliver(job)) == "succeeded"
    suspended = await db.fetchval("SELECT suspended_until FROM distribution_targets WHERE id = $1", target_id)
    assert abs((suspended - reset).total_seconds()) < 2
    assert await worker.claim(1) == [], "the next job waits for the reset instead of meeting a 429"


async def test_a_job_throttled_past_the_limit_fails(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    receiver.behaviour.status = 429
    receiver.behaviour.headers = {"retry-after": "1"}
    plan, _ = await publish(service, [receiver.url])
    [job] = await worker.claim(1)
    await db.execute("UPDATE distribution_jobs SET throttled_since = now() - interval '25 hours'")
    assert await worker.record(job, await worker.deliver(job)) == "failed"
    done = await plan_of(service, plan.id)
    assert done.status == "failed" and done.jobs[0].last_error == THROTTLED_TOO_LONG


async def test_a_503_with_retry_after_throttles_and_one_without_is_an_ordinary_retry(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    receiver.behaviour.status = 503
    plan, [target_id] = await publish(service, [receiver.url])
    await worker.run_once()
    assert await db.fetchval("SELECT throttles FROM distribution_jobs WHERE plan_id = $1", plan.id) == 0
    assert await db.fetchval("SELECT suspended_until FROM distribution_targets WHERE id = $1", target_id) is None

    receiver.behaviour.headers = {
        "retry-after": format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    }
    await db.execute("UPDATE distribution_jobs SET next_attempt_at = now() WHERE plan_id = $1", plan.id)
    await worker.run_once()
    assert await db.fetchval("SELECT throttles FROM distribution_jobs WHERE plan_id = $1", plan.id) == 1
    assert await db.fetchval("SELECT suspended_until FROM distribution_targets WHERE id = $1", target_id) is not None


NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (429, {}, (True, None)),
        (429, {"retry-after": "7"}, (True, NOW + timedelta(seconds=7))),
        # Mastodon's 429 names its time in X-RateLimit-Reset only.
        (429, {"x-ratelimit-reset": "2026-11-25T12:05:00.000Z"}, (True, NOW + timedelta(minutes=5))),
        (
            429,
            {"retry-after": "7", "x-ratelimit-reset": "2026-11-25T12:05:00.000Z"},
            (True, NOW + timedelta(seconds=7)),
        ),
        (503, {"retry-after": "Wed, 25 Nov 2026 12:00:30 GMT"}, (True, NOW + timedelta(seconds=30))),
        (503, {}, (False, None)),
        (500, {"retry-after": "7"}, (False, None)),
        (
            200,
            {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "2026-11-25T12:05:00.000Z"},
            (True, NOW + timedelta(minutes=5)),
        ),
        (
            200,
            {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int((NOW + timedelta(seconds=90)).timestamp()))},
            (True, NOW + timedelta(seconds=90)),
        ),
        (200, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "15"}, (True, NOW + timedelta(seconds=15))),
        (200, {"x-ratelimit-remaining": "3", "x-ratelimit-reset": "15"}, (False, None)),
        (200, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "garbage"}, (False, None)),
    ],
)
def test_throttle_signals_are_read_from_status_and_headers(status: int, headers: dict, expected: tuple) -> None:
    assert ratelimit.throttle(status, headers, NOW) == expected


# --- the fast lane -----------------------------------------------------------------------------


async def queue_backlog(db: asyncpg.Connection, plan_id: UUID, target_id: UUID, count: int) -> None:
    """``count`` more queued jobs for ``target_id``, due now, in the plan ``plan_id``."""
    await db.execute(
        "INSERT INTO distribution_jobs (plan_id, target_id, max_attempts, payload_snapshot) "
        "SELECT $1, $2, 8, payload_snapshot FROM distribution_jobs, generate_series(1, $3) "
        "WHERE plan_id = $1 LIMIT $3",
        plan_id,
        target_id,
        count,
    )


async def test_an_awaited_plan_is_delivered_ahead_of_a_backlog(
    service: DistributionService, worker: Worker, db: asyncpg.Connection
) -> None:
    with WebhookReceiver() as slow, WebhookReceiver() as fast:
        slow.behaviour.delay = 0.2  # 20 slots drain about 100 jobs a second: 20,000 take minutes
        backlog, [slow_target] = await publish(service, [slow.url])
        await queue_backlog(db, backlog.id, slow_target, 20_000)
        item_plan, [fast_target] = await publish(service, [fast.url])
        async with running(worker):
            await anyio.to_thread.run_sync(slow.wait_for, 20)
            done = await service.create_distribution_plan(
                CreateDistributionPlanInput(
                    content_item_id=item_plan.content_item_id,
                    target_ids=[fast_target],
                    await_delivery=True,
                    allow_duplicate=True,
                )
            )
    assert done.status == "succeeded" and done.await_timed_out is False
    assert await db.fetchval("SELECT count(*) FROM distribution_jobs WHERE status = 'queued'") > 19_000


async def test_half_of_each_claim_is_kept_for_first_attempts(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    retries, [target_id] = await publish(service, [receiver.url])
    await queue_backlog(db, retries.id, target_id, 29)
    # Thirty retries that have waited longest, then thirty first attempts.
    await db.execute(
        "UPDATE distribution_jobs SET attempt = 1, next_attempt_at = now() - interval '1 hour' WHERE plan_id = $1",
        retries.id,
    )
    fresh, _ = await publish(service, [receiver.url])
    await queue_backlog(db, fresh.id, target_id, 29)
    claimed = await worker.claim(10)
    assert len(claimed) == 10
    assert sum(job.plan_id == fresh.id for job in claimed) == 5


async def test_the_claim_walks_its_indexes_at_a_hundred_thousand_queued_jobs(
    service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    plan, [target_id] = await publish(service, [receiver.url])
    await queue_backlog(db, plan.id, target_id, 100_000)
    await db.execute("UPDATE distribution_jobs SET attempt = 1 WHERE random() < 0.5")
    await db.execute("ANALYZE distribution_jobs")
    plan_json = await db.fetchval(f"EXPLAIN (FORMAT JSON) {queries.CLAIM_JOBS}", 20, 30.0, "explain", uuid.uuid4())
    text = json.dumps(plan_json)
    assert '"Index Name": "distribution_jobs_claim_fresh"' in text, text
    assert '"Index Name": "distribution_jobs_claim"' in text, text
    assert '"Relation Name": "distribution_jobs", "Alias": "j", "Node Type": "Seq Scan"' not in text
    assert '"Node Type": "Sort"' not in text, "the claim must read the index in order, not sort the queue"


# --- cancelling what is in flight --------------------------------------------------------------


async def test_cancelling_a_plan_stops_its_delivery_in_flight(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    receiver.behaviour.hang = True
    plan, _ = await publish(service, [receiver.url])
    async with running(worker):
        await anyio.to_thread.run_sync(receiver.wait_for, 1)
        cancelled_at = time.monotonic()
        await service.cancel_plan(PlanRef(plan_id=plan.id))
        done = await eventually(lambda: _cancelled(service, plan.id), within=3)
        took = time.monotonic() - cancelled_at
    print(f"cancelled {took:.2f} s after cancel_plan")
    assert done.jobs[0].status == "cancelled"
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.error_message == "Cancelled in flight: the request had been sent." or (
        receipt.error_message == "Cancelled in flight: the request may have been sent."
    )
    assert len(receiver.requests) == 1


async def _cancelled(service: DistributionService, plan_id: UUID):
    plan = await plan_of(service, plan_id)
    return plan if plan.status == "cancelled" else None


async def test_a_lost_cancel_notification_is_made_up_for_by_the_heartbeat(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    worker._on_cancel = lambda _payload: None  # the notification never arrives
    gate = threading.Event()
    receiver.behaviour.gate = gate
    plan, _ = await publish(service, [receiver.url])
    try:
        async with running(worker):
            await anyio.to_thread.run_sync(receiver.wait_for, 1)
            await service.cancel_plan(PlanRef(plan_id=plan.id))
            assert (await plan_of(service, plan.id)).jobs[0].status == "running"
            assert await worker.heartbeat() == set()
            done = await eventually(lambda: _cancelled(service, plan.id), within=3)
    finally:
        gate.set()
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.error_message.startswith("Cancelled in flight") and done.jobs[0].status == "cancelled"


# --- per-target limits -------------------------------------------------------------------------


async def limited_target(service: DistributionService, url: str, **limits: float) -> UUID:
    target = await service.register_target(
        RegisterTargetInput(
            name=f"limited-{uuid.uuid4().hex[:6]}", channel_type="webhook", config={"url": url}, **limits
        )
    )
    assert (target.max_concurrency, target.rate_per_minute) == (
        limits.get("max_concurrency"),
        limits.get("rate_per_minute"),
    )
    return target.id


async def plan_for(service: DistributionService, target_id: UUID, db: asyncpg.Connection, jobs: int) -> UUID:
    item = await service.upsert_content_item(UpsertContentItemInput(title="Limited", body="b"))
    plan = await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target_id])
    )
    await queue_backlog(db, plan.id, target_id, jobs - 1)
    return plan.id


async def test_a_concurrency_limit_holds_across_workers_in_the_claim(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    target_id = await limited_target(service, receiver.url, max_concurrency=2)
    await plan_for(service, target_id, db, 5)
    first, second = Worker(runtime, name="first"), Worker(runtime, name="second")
    claimed = await first.claim(10)
    assert len(claimed) == 2
    assert await second.claim(10) == [], "the room is taken, whoever asks"
    await first.record(claimed[0], await first.deliver(claimed[0]))
    assert len(await second.claim(10)) == 1


async def test_the_claim_counts_running_jobs_in_a_snapshot_taken_after_it_locks_the_target(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    """A claim that began before another worker's claim committed, and locked the target after,
    must see that worker's running job, or both fill a concurrency limit's last slot."""
    target_id = await limited_target(service, receiver.url, max_concurrency=1)
    await plan_for(service, target_id, db, 2)
    assert "wordclaw_running_jobs(l.id)" in queries.CLAIM_JOBS
    late = await service.pool.acquire()
    await db.execute("SELECT pg_advisory_lock(6006)")
    try:
        # The statement's snapshot is taken when it starts; it then waits at the gate, as a
        # claim waits its turn for the target.
        counts = anyio.Event()
        result: dict[str, int] = {}

        async def count() -> None:
            row = await late.fetchrow(
                "SELECT (SELECT count(*) FROM distribution_jobs WHERE target_id = $1 AND status = 'running')"
                " AS in_the_statements_snapshot, wordclaw_running_jobs($1) AS at_the_call"
                " FROM (SELECT pg_advisory_xact_lock(6006)) AS gate",
                target_id,
            )
            result.update(row)
            counts.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(count)
            late_pid = late.get_server_pid()
            await eventually(lambda: waiting_for_a_lock(db, late_pid), within=10)
            # Meanwhile another worker claims a job and commits.
            async with service.pool.acquire() as other:
                assert len(await other.fetch(queries.CLAIM_JOBS, 10, 30.0, "other", uuid.uuid4())) == 1
            await db.execute("SELECT pg_advisory_unlock(6006)")  # opens the gate
            with anyio.fail_after(10):
                await counts.wait()
    finally:
        await db.execute("SELECT pg_advisory_unlock_all()")
        await service.pool.release(late)
    assert result == {"in_the_statements_snapshot": 0, "at_the_call": 1}


async def test_a_concurrency_limit_of_one_is_never_exceeded_by_two_worker_daemons(
    runtime: Runtime, service: DistributionService, db: asyncpg.Connection
) -> None:
    with WebhookReceiver() as receiver:
        receiver.behaviour.delay = 0.05
        target_id = await limited_target(service, receiver.url, max_concurrency=1)
        plan_id = await plan_for(service, target_id, db, 12)
        async with running(Worker(runtime, name="one")), running(Worker(runtime, name="two")):
            done = await eventually(lambda: _final_plan(service, plan_id), within=30)
    assert done.status == "succeeded" and len(receiver.requests) == 12
    assert receiver.most_in_flight == 1


async def _final_plan(service: DistributionService, plan_id: UUID):
    plan = await plan_of(service, plan_id)
    return plan if plan.status in {"succeeded", "partial", "failed", "cancelled"} else None


async def test_a_rate_limit_holds_across_workers_in_the_claim(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    target_id = await limited_target(service, receiver.url, rate_per_minute=6)  # a token every 10 s
    await plan_for(service, target_id, db, 20)
    first, second = Worker(runtime, name="first"), Worker(runtime, name="second")
    assert len(await first.claim(4)) == 4
    assert len(await second.claim(10)) == 2, "the bucket holds a minute's worth: 6"
    assert await first.claim(10) == [] and await second.claim(10) == []
    # Ten seconds later one more token has come in.
    await db.execute("UPDATE distribution_targets SET rate_updated_at = rate_updated_at - interval '10 seconds'")
    assert len(await second.claim(10)) == 1
    assert await first.claim(10) == []


async def test_two_claims_at_the_same_moment_cannot_both_fill_a_limited_targets_room(
    service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    target_id = await limited_target(service, receiver.url, max_concurrency=1)
    await plan_for(service, target_id, db, 3)
    first, second = await service.pool.acquire(), await service.pool.acquire()
    try:
        async with first.transaction():
            # The first claim has not committed, so its running job is invisible to the second.
            assert len(await first.fetch(queries.CLAIM_JOBS, 10, 30.0, "first", uuid.uuid4())) == 1
            with anyio.fail_after(5):
                assert await second.fetch(queries.CLAIM_JOBS, 10, 30.0, "second", uuid.uuid4()) == []
    finally:
        await service.pool.release(first)
        await service.pool.release(second)


async def test_an_outcome_written_while_the_heartbeat_runs_is_not_taken_for_a_lost_lease(
    runtime: Runtime, service: DistributionService, worker: Worker, receiver: WebhookReceiver, caplog
) -> None:
    plan, _ = await publish(service, [receiver.url])
    [job] = await worker.claim(1)
    result = await worker.deliver(job)
    # The outcome commits as the heartbeat runs, before the writer's bookkeeping catches up:
    # written here through another Worker, so this one still counts the attempt as held.
    assert await Worker(runtime).record(job, result) == "succeeded"
    assert await worker.heartbeat() == set(), "one missed renewal is not a lost lease"
    assert await worker.record(job, result) is None  # the writer catches up; nothing moves twice
    assert await worker.heartbeat() == set()
    assert "lost the lease" not in caplog.text
    assert (await plan_of(service, plan.id)).status == "succeeded"
