"""Dead letters: permanent failures, 410 Gone, and redrive with a fresh budget. Real PostgreSQL,
real HTTP receivers, the SDK's real MCP client."""

from __future__ import annotations

import anyio
import asyncpg
import pytest
from mcp import Client

from queue_worker.worker import TARGET_GONE, Worker
from tests.helpers import call, call_error, publish
from tests.test_worker import plan_of, receipts_of
from wordclaw_mcp.cli import main
from wordclaw_mcp.config import Settings
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


async def test_a_410_deactivates_the_target_and_fails_its_queued_jobs_as_gone(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    receiver.behaviour.status = 410
    first, [target_id] = await publish(service, [receiver.url])
    second, _ = await publish(service, [receiver.url])
    await db.execute("UPDATE distribution_jobs SET target_id = $1 WHERE plan_id = $2", target_id, second.id)
    [job] = await worker.claim(1)
    assert await worker.record(job, await worker.deliver(job)) == "failed"

    assert await db.fetchval("SELECT active FROM distribution_targets WHERE id = $1", target_id) is False
    gone = (await plan_of(service, second.id)).jobs[0]
    assert (gone.status, gone.last_error) == ("failed", TARGET_GONE)
    answered = (await plan_of(service, first.id)).jobs[0]
    assert (answered.status, answered.last_error) == ("failed", "The endpoint answered HTTP 410 Gone.")
    assert len(receiver.requests) == 1


async def test_exhausted_attempts_leave_a_dead_letter_that_a_redrive_of_its_plan_drives_again(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    receiver.behaviour.status = 500
    plan, _ = await publish(service, [receiver.url, receiver.url + "?ok"])
    await db.execute("UPDATE distribution_jobs SET max_attempts = 2 WHERE plan_id = $1", plan.id)
    for _ in range(2):
        await worker.run_once()
        await db.execute("UPDATE distribution_jobs SET next_attempt_at = now() WHERE plan_id = $1", plan.id)
    dead = await plan_of(service, plan.id)
    assert dead.status == "failed" and [job.status for job in dead.jobs] == ["failed", "failed"]

    receiver.behaviour.status = 200
    assert len(await service.redrive(plan_id=plan.id)) == 2
    requeued = await plan_of(service, plan.id)
    assert requeued.status == "running" and requeued.completed_at is None
    assert all(job.status == "queued" and job.max_attempts == 2 + 8 for job in requeued.jobs), requeued.jobs
    await worker.run_once()
    done = await plan_of(service, plan.id)
    assert done.status == "succeeded" and [job.attempt for job in done.jobs] == [3, 3]
    assert sorted(await receipts_of(service, plan.id)) == [(1, False)] * 2 + [(2, False)] * 2 + [(3, True)] * 2


async def test_a_redrive_of_a_target_or_a_job_touches_only_those_and_skips_inactive_targets(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    receiver.behaviour.status = 400
    plan, target_ids = await publish(service, [receiver.url, receiver.url + "?b", receiver.url + "?c"])
    await worker.run_once()
    jobs = {job.target_id: job.id for job in (await plan_of(service, plan.id)).jobs}

    assert await service.redrive(target_id=target_ids[0]) == [jobs[target_ids[0]]]
    assert await service.redrive(job_ids=[jobs[target_ids[1]]]) == [jobs[target_ids[1]]]
    await db.execute("UPDATE distribution_targets SET active = false WHERE id = $1", target_ids[2])
    assert await service.redrive(plan_id=plan.id) == [], "a job whose target is inactive could never be claimed"
    statuses = {job.target_id: job.status for job in (await plan_of(service, plan.id)).jobs}
    assert statuses == {target_ids[0]: "queued", target_ids[1]: "queued", target_ids[2]: "failed"}


async def test_retry_plan_over_mcp_drives_failed_jobs_again_and_refuses_what_it_cannot(
    mcp_client_no_worker: Client, service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    receiver.behaviour.status = 404
    plan, _ = await publish(service, [receiver.url, receiver.url + "?b"])
    await worker.run_once()
    client = mcp_client_no_worker
    failed = [job["id"] for job in (await call(client, "get_plan", planId=str(plan.id)))["jobs"]]

    retried = await call(client, "retry_plan", planId=str(plan.id), jobIds=failed[:1])
    assert [job["status"] for job in retried["jobs"]] == ["queued", "failed"]
    error = await call_error(client, "retry_plan", planId=str(plan.id), jobIds=failed[:1])
    assert error["code"] == "JOB_NOT_FAILED" and error["details"]["jobStatuses"] == {failed[0]: "queued"}
    error = await call_error(client, "retry_plan", planId=str(plan.id), jobIds=[str(plan.content_item_id)])
    assert error["code"] == "JOB_NOT_FOUND"
    assert (await call_error(client, "retry_plan", planId=str(plan.content_item_id)))["code"] == "PLAN_NOT_FOUND"

    everything = await call(client, "retry_plan", planId=str(plan.id))
    assert [job["status"] for job in everything["jobs"]] == ["queued", "queued"]
    assert everything["status"] == "running"


async def test_the_operator_redrives_from_the_command_line_and_sees_the_workers(
    service: DistributionService,
    worker: Worker,
    receiver: WebhookReceiver,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WORDCLAW_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("WORDCLAW_SECRET_KEYS", settings.secret_keys[0])
    monkeypatch.setenv("WORDCLAW_HOME", str(settings.home))
    receiver.behaviour.status = 400
    plan, [target_id] = await publish(service, [receiver.url])
    await worker.run_once()
    [job] = (await plan_of(service, plan.id)).jobs

    for flag, ident in (("--job", job.id), ("--target", target_id), ("--plan", plan.id)):
        assert await anyio.to_thread.run_sync(main, ["jobs", "redrive", flag, str(ident)]) == 0
        assert capsys.readouterr().out.strip() == "1 failed job(s) queued again"
        assert (await plan_of(service, plan.id)).jobs[0].status == "queued"
        await worker.run_once()  # fails again (400): a dead letter once more
    assert [r for r, _ in await receipts_of(service, plan.id)] == [1, 2, 3, 4]

    assert await anyio.to_thread.run_sync(main, ["workers"]) == 0
    assert capsys.readouterr().out.strip() == "no worker is running"
    await worker.heartbeat()
    assert await anyio.to_thread.run_sync(main, ["workers"]) == 0
    out = capsys.readouterr().out
    assert worker.name in out and "last heartbeat" in out
