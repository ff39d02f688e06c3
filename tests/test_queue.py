"""The queue: claim, deliver, record, retry, roll up. Real PostgreSQL, real HTTP receiver."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest

from queue_worker.worker import Worker
from tests.helpers import (
    await_plan_around,
    database_name,
    eventually,
    new_signing_secret,
    publish,
    terminate_backends,
)
from wordclaw_mcp import queries
from wordclaw_mcp.config import Settings
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import (
    CreateDistributionPlanInput,
    PlanRef,
    RegisterTargetInput,
    UpsertContentItemInput,
)
from wordclaw_mcp.notifications import PLANS_CHANNEL
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.redaction import REDACTED
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


async def test_a_plan_queues_one_job_per_target_with_a_payload_snapshot(
    service: DistributionService, db: asyncpg.Connection, receiver: WebhookReceiver
) -> None:
    plan, target_ids = await publish(service, [receiver.url, receiver.url + "?second", receiver.url + "?third"])
    assert plan.status == "queued"
    assert [job.target_id for job in plan.jobs] == target_ids
    assert all(job.status == "queued" and job.attempt == 0 for job in plan.jobs)
    # The plan comes back from the statement that created it; reading it again finds the same.
    assert plan == await service.get_plan(PlanRef(plan_id=plan.id))

    item_id = plan.content_item_id
    await service.upsert_content_item(UpsertContentItemInput(id=item_id, title="Changed later", body="new"))
    snapshots = await db.fetch("SELECT payload_snapshot FROM distribution_jobs WHERE plan_id = $1", plan.id)
    assert [row["payload_snapshot"]["data"]["title"] for row in snapshots] == ["Title"] * 3


async def test_a_delivery_succeeds_rolls_the_plan_up_and_leaves_a_receipt(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    plan, _ = await publish(service, [receiver.url])
    assert await worker.run_once() == 1

    done = await service.get_plan(PlanRef(plan_id=plan.id))
    assert done.status == "succeeded"
    assert done.completed_at is not None
    assert [(job.status, job.attempt) for job in done.jobs] == [("succeeded", 1)]
    receipts = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert [(r.attempt, r.succeeded, r.status_code) for r in receipts] == [(1, True, 200)]
    assert receipts[0].external_url == receiver.url
    assert len(receiver.requests) == 1

    events = [
        row["event_type"]
        for row in await db.fetch("SELECT event_type FROM distribution_events WHERE plan_id = $1 ORDER BY id", plan.id)
    ]
    assert events == [
        "distribution.plan.created",
        "distribution.job.succeeded",
        "distribution.plan.completed",
    ]


async def test_concurrent_claims_skip_each_others_locked_jobs(
    service: DistributionService, receiver: WebhookReceiver
) -> None:
    await publish(service, [f"{receiver.url}?n={n}" for n in range(4)])
    await publish(service, [f"{receiver.url}?m={n}" for n in range(2)])
    first = await service.pool.acquire()
    second = await service.pool.acquire()
    try:
        async with first.transaction():
            mine = await first.fetch(queries.CLAIM_JOBS, 4, 60.0, "first", uuid.uuid4())
            # The first claim's row locks are still held: the second skips those rows.
            with anyio.fail_after(5):
                theirs = await second.fetch(queries.CLAIM_JOBS, 10, 60.0, "second", uuid.uuid4())
        assert len(mine) == 4
        assert len(theirs) == 2
        assert {row["id"] for row in mine}.isdisjoint({row["id"] for row in theirs})
    finally:
        await service.pool.release(first)
        await service.pool.release(second)


async def test_the_last_two_jobs_finishing_at_once_still_complete_the_plan(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    """Each transaction alone sees the other's job still running; the plan must not stick."""
    plan, _ = await publish(service, [receiver.url, receiver.url + "?b"])
    jobs = await worker.claim(2)
    results = [await worker.deliver(job) for job in jobs]
    first = await service.pool.acquire()
    second = await service.pool.acquire()
    second_done = anyio.Event()

    async def finish_second() -> None:
        async with second.transaction():
            await worker.record(jobs[1], results[1], conn=second)
        second_done.set()

    try:
        async with anyio.create_task_group() as tg:
            async with first.transaction():
                await worker.record(jobs[0], results[0], conn=first)
                tg.start_soon(finish_second)
                # The second waits on the plan row this transaction locked, whatever it saw.
                with anyio.move_on_after(0.5):
                    await second_done.wait()
                assert not second_done.is_set()
    finally:
        await service.pool.release(first)
        await service.pool.release(second)
    assert (await service.get_plan(PlanRef(plan_id=plan.id))).status == "succeeded"


async def test_mixed_outcomes_make_a_partial_plan(
    service: DistributionService, worker: Worker, db: asyncpg.Connection
) -> None:
    with WebhookReceiver() as good, WebhookReceiver() as bad:
        bad.behaviour.status = 404
        plan, _ = await publish(service, [good.url, bad.url])
        await worker.run_once()
    done = await service.get_plan(PlanRef(plan_id=plan.id))
    assert done.status == "partial"
    assert sorted(job.status for job in done.jobs) == ["failed", "succeeded"]
    failed = next(job for job in done.jobs if job.status == "failed")
    assert failed.last_error == "The endpoint answered HTTP 404 Not Found."
    assert (
        await db.fetchval(
            "SELECT count(*) FROM distribution_events WHERE plan_id = $1 AND event_type = 'distribution.job.failed'",
            plan.id,
        )
        == 1
    )


async def test_a_server_error_schedules_a_jittered_retry(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    receiver.behaviour.status = 503
    plan, _ = await publish(service, [receiver.url])
    before = datetime.now(UTC)
    await worker.run_once()

    job = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs[0]
    assert (job.status, job.attempt) == ("queued", 1)
    # First retry: 5 s ± 10 %.
    assert before + timedelta(seconds=4.4) <= job.next_attempt_at <= datetime.now(UTC) + timedelta(seconds=5.6)
    assert job.last_error == "The endpoint answered HTTP 503 Service Unavailable."
    assert (await service.get_plan(PlanRef(plan_id=plan.id))).status == "running"
    assert await worker.run_once() == 0  # not due yet

    await db.execute("UPDATE distribution_jobs SET next_attempt_at = now() WHERE plan_id = $1", plan.id)
    receiver.behaviour.status = 200
    assert await worker.run_once() == 1
    done = await service.get_plan(PlanRef(plan_id=plan.id))
    assert (done.status, done.jobs[0].attempt) == ("succeeded", 2)
    receipts = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert [(r.attempt, r.status_code) for r in receipts] == [(1, 503), (2, 200)]
    ids = {request.headers["webhook-id"] for request in receiver.requests}
    assert ids == {str(done.jobs[0].id)}, "webhook-id must stay the same across retries"


async def test_the_last_allowed_attempt_fails_the_job(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    receiver.behaviour.status = 500
    plan, _ = await publish(service, [receiver.url])
    await db.execute("UPDATE distribution_jobs SET max_attempts = 1 WHERE plan_id = $1", plan.id)
    await worker.run_once()
    done = await service.get_plan(PlanRef(plan_id=plan.id))
    assert (done.status, done.jobs[0].status) == ("failed", "failed")


async def test_retry_after_is_honoured_when_longer_than_the_schedule(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    receiver.behaviour.status = 429
    receiver.behaviour.headers = {"retry-after": "120"}
    plan, _ = await publish(service, [receiver.url])
    before = datetime.now(UTC)
    await worker.run_once()
    job = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs[0]
    assert job.status == "queued"
    assert job.next_attempt_at >= before + timedelta(seconds=119)
    receipt = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts[0]
    assert receipt.raw_meta["responseHeaders"]["retry-after"] == "120"


async def test_an_unreachable_endpoint_fails_the_attempt_with_a_receipt(
    service: DistributionService, worker: Worker
) -> None:
    closed = WebhookReceiver()
    url = closed.url
    closed.close()  # nothing listens on that port any more
    plan, _ = await publish(service, [url])
    await worker.run_once()
    job = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs[0]
    assert (job.status, job.attempt) == ("queued", 1)
    receipt = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts[0]
    assert receipt.succeeded is False
    assert receipt.status_code is None
    assert "ConnectError" in receipt.error_message


async def test_cancelling_every_job_cancels_the_plan(service: DistributionService, receiver: WebhookReceiver) -> None:
    plan, _ = await publish(service, [receiver.url])
    cancelled = await service.cancel_plan(PlanRef(plan_id=plan.id))
    assert cancelled.status == "cancelled"
    assert cancelled.completed_at is not None
    assert receiver.requests == []


async def test_the_worker_daemon_wakes_on_new_jobs_and_stops_cleanly(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="queue_worker.worker")
    # With the poll pushed out of reach, only the NOTIFY of the new jobs can wake the worker in time.
    worker = Worker(replace(runtime, settings=replace(runtime.settings, poll_interval=60.0)))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await anyio.wait_all_tasks_blocked()  # idle, waiting
            plan, _ = await publish(service, [receiver.url])
            done = await service.await_plan(plan.id, 5)
            worker.stop()
        # Leaving the task group means run() returned: it stopped, within the deadline.
    assert done.status == "succeeded"
    assert done.receipts and done.receipts[0].succeeded
    assert f"worker {worker.name} stopped" in caplog.text
    assert worker._holding == 0 and worker._outcomes == []


async def test_stopping_mid_delivery_records_the_interrupted_attempt_and_requeues(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, settings
) -> None:
    receiver.behaviour.hang = True
    plan, _ = await publish(service, [receiver.url])
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await anyio.to_thread.run_sync(receiver.wait_for, 1)
            worker.stop()  # the delivery hangs past the grace period and is cancelled
    job = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs[0]
    assert (job.status, job.attempt) == ("queued", 1)
    receipt = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts[0]
    assert "shut down" in receipt.error_message
    # Released, not left to its lease: another worker takes it at once.
    [taken] = await Worker(service.runtime, name="another").claim(1)
    assert (taken.id, taken.attempt) == (job.id, 2)


async def test_secrets_are_encrypted_at_rest_and_redacted_from_receipts(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    secret = new_signing_secret()
    receiver.behaviour.status = 400
    receiver.behaviour.body = json.dumps({"error": f"bad signature for key {secret}"}).encode()
    plan, target_ids = await publish(service, [receiver.url], secret=secret)
    await worker.run_once()

    stored = await db.fetchrow("SELECT * FROM distribution_targets WHERE id = $1", target_ids[0])
    assert secret.encode() not in stored["secret_ciphertext"]
    assert secret not in json.dumps(dict(stored), default=str)
    receipt = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts[0]
    assert secret not in receipt.model_dump_json()
    assert "[redacted]" in receipt.raw_meta["responseBody"]
    every_row = await db.fetch(
        "SELECT r::text FROM distribution_receipts r UNION ALL SELECT e::text FROM distribution_events e"
    )
    assert all(secret not in row[0] for row in every_row)


async def test_jobs_of_a_suspended_target_are_not_claimed(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    _plan, target_ids = await publish(service, [receiver.url])
    await db.execute(
        "UPDATE distribution_targets SET suspended_until = now() + interval '1 hour' WHERE id = $1", target_ids[0]
    )
    assert await worker.run_once() == 0
    await db.execute("UPDATE distribution_targets SET suspended_until = NULL WHERE id = $1", target_ids[0])
    assert await worker.run_once() == 1


async def test_a_content_update_bumps_the_version_and_plans_record_it(service: DistributionService) -> None:
    item = await service.upsert_content_item(UpsertContentItemInput(title="One", body="b"))
    updated = await service.upsert_content_item(UpsertContentItemInput(id=item.id, title="Two", body="b"))
    assert (item.version, updated.version) == (1, 2)
    target = await service.register_target(
        RegisterTargetInput(name="t", channel_type="webhook", config={"url": "https://example.com/hook"})
    )
    plan = await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id])
    )
    assert plan.content_version == 2


async def test_await_plan_wakes_on_notification_not_the_poll(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the safety poll pushed out of reach, only the NOTIFY can end the wait in time.
    monkeypatch.setattr("wordclaw_mcp.service.AWAIT_POLL_SECONDS", 60.0)
    plan, _ = await publish(service, [receiver.url])
    done = await await_plan_around(service, plan.id, worker.run_once)
    assert done.status == "succeeded"
    assert done.await_timed_out is False


async def test_a_plan_notifies_its_end_and_not_its_claim(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    # A notifying transaction holds a database-wide lock through its commit: claims must not.
    plan, _ = await publish(service, [receiver.url])
    heard: list[str] = []

    def hear(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        heard.append(payload)

    await db.add_listener(PLANS_CHANNEL, hear)
    try:
        [job] = await worker.claim(1)
        assert (await service.get_plan(PlanRef(plan_id=plan.id))).status == "running"
        await worker.record(job, await worker.deliver(job))
        # Notifications arrive in commit order, so one from the claim would be here first.
        await eventually(lambda: _true(heard))
        assert heard == [str(plan.id)]
    finally:
        await db.remove_listener(PLANS_CHANNEL, hear)


async def _true(value: object) -> bool:
    return bool(value)


async def test_await_plan_is_woken_again_after_the_listen_connection_is_lost(
    runtime: Runtime,
    service: DistributionService,
    worker: Worker,
    receiver: WebhookReceiver,
    postgres_server_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await terminate_backends(postgres_server_url, database_name(runtime.settings.database_url))
    # The client library notices the kill asynchronously.
    await eventually(lambda: _true(not runtime.notifications.connected))
    await runtime.pool.expire_connections()
    monkeypatch.setattr("wordclaw_mcp.notifications.RECONNECT_INTERVAL", 0.0)
    # Only the re-established LISTEN can end this wait in time: the poll is pushed out of reach.
    monkeypatch.setattr("wordclaw_mcp.service.AWAIT_POLL_SECONDS", 60.0)
    plan, _ = await publish(service, [receiver.url])
    done = await await_plan_around(
        service, plan.id, worker.run_once, ready=lambda: eventually(lambda: _true(runtime.notifications.connected))
    )
    assert done.status == "succeeded"


async def _true(value: bool) -> bool:
    return value


async def test_a_rescued_attempt_that_was_the_last_allowed_fails_the_job(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    plan, _ = await publish(service, [receiver.url])
    await db.execute("UPDATE distribution_jobs SET max_attempts = 1")
    await worker.claim(1)
    await db.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 second'")
    assert await worker.rescue() == 1
    done = await service.get_plan(PlanRef(plan_id=plan.id))
    assert (done.status, done.jobs[0].status) == ("failed", "failed")


async def test_the_worker_daemon_rides_out_losing_its_database(
    runtime: Runtime, settings: Settings, worker: Worker, receiver: WebhookReceiver, postgres_server_url: str
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await anyio.wait_all_tasks_blocked()
        await terminate_backends(postgres_server_url, database_name(settings.database_url))
        # The agent is another process, with connections of its own; the worker recovers alone.
        async with Runtime.open(settings) as elsewhere:
            service = DistributionService(elsewhere)
            plan, _ = await publish(service, [receiver.url])
            done = await service.await_plan(plan.id, 15)
        worker.stop()
    assert done.status == "succeeded", done


async def test_an_adapter_crash_is_logged_and_receipted_without_the_secret(
    runtime: Runtime,
    service: DistributionService,
    worker: Worker,
    receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from queue_worker.adapters import WebhookAdapter

    class LeakyAdapter(WebhookAdapter):
        """Crashes the way h11 does on a bad header: quoting the value it was given."""

        async def deliver(self, payload, target, *, message_id=None):
            raise ValueError(f"Illegal header value {target.secrets['signingSecret']!r}")

    secret = new_signing_secret()
    runtime.adapters.register(LeakyAdapter(runtime.adapters.get("webhook").options))
    plan, _ = await publish(service, [receiver.url], secret=secret)
    await worker.run_once()

    assert "adapter webhook crashed" in caplog.text
    assert "ValueError" in caplog.text and REDACTED in caplog.text
    assert secret not in caplog.text
    receipt = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts[0]
    assert receipt.error_message == "The webhook adapter failed: ValueError."
    job = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs[0]
    assert (job.status, job.attempt) == ("queued", 1)


@pytest.mark.parametrize("crash", [False, True], ids=["echoed", "crashed"])
async def test_secrets_an_adapter_declares_are_scrubbed_like_the_targets(
    runtime: Runtime,
    service: DistributionService,
    worker: Worker,
    receiver: WebhookReceiver,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    crash: bool,
) -> None:
    import secrets

    from queue_worker.adapters import DeliveryResult, WebhookAdapter, declare_secrets

    token = f"session-{secrets.token_hex(16)}"

    class SessionAdapter(WebhookAdapter):
        """Comes by a session token as it delivers (as Bluesky's login does), which the channel's
        answer, or the exception it raises, quotes back."""

        async def deliver(self, payload, target, *, message_id=None):
            declare_secrets(token)
            if crash:
                raise ValueError(f"Illegal header value 'Bearer {token}'")
            return DeliveryResult(
                succeeded=False,
                error=f"401: Bearer {token} is not valid",
                external_url=f"https://e.example/?session={token}",
                raw_meta={"responseBody": json.dumps({"authorization": f"Bearer {token}"})},
            )

    runtime.adapters.register(SessionAdapter(runtime.adapters.get("webhook").options))
    plan, _ = await publish(service, [receiver.url])
    await worker.run_once()

    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == ("queued" if crash else "failed")
    if crash:
        assert "adapter webhook crashed" in caplog.text and f"Bearer {REDACTED}" in caplog.text
    else:
        assert job.last_error == f"401: Bearer {REDACTED} is not valid"
    stored = [
        text
        for table in ("distribution_receipts", "distribution_jobs", "distribution_events")
        for (text,) in await db.fetch(f"SELECT to_jsonb(t)::text FROM {table} t")
    ]
    assert not [text for text in [*stored, caplog.text] if token in text]


async def test_a_plan_naming_a_deactivated_target_is_refused(
    service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    plan, target_ids = await publish(service, [receiver.url])
    await db.execute("UPDATE distribution_targets SET active = false WHERE id = $1", target_ids[0])
    with pytest.raises(DistributionError) as refused:
        await service.create_distribution_plan(
            CreateDistributionPlanInput(content_item_id=plan.content_item_id, target_ids=target_ids)
        )
    assert refused.value.code == "TARGET_INACTIVE"
    assert refused.value.details["inactiveTargetIds"] == [str(target_ids[0])]


async def test_an_item_whose_body_arrives_as_html_is_kept_as_markdown(service: DistributionService) -> None:
    item = await service.upsert_content_item(
        UpsertContentItemInput(
            title="From a CMS",
            body="<h2>Launch</h2><p>We <em>shipped</em> <a href='https://e.com'>it</a>.</p><script>x()</script>",
            body_format="html",
        )
    )
    assert item.body == "## Launch\n\nWe *shipped* [it](https://e.com)."
