"""A late success arriving after the job was rescued, failed, redriven and claimed by a third
worker; and a release racing a rescue: the claim token decides what moves."""

from __future__ import annotations

import asyncpg
import pytest

from queue_worker.worker import Outcome, Worker
from tests.helpers import publish
from wordclaw_mcp.adapters import DeliveryResult
from wordclaw_mcp.models import PlanRef
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


async def expire(db: asyncpg.Connection) -> None:
    await db.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 s' WHERE status = 'running'")


async def test_a_late_success_after_a_redrive_ends_the_job_once_and_keeps_the_counters_true(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    a, b, c = (Worker(runtime, name=name) for name in "abc")
    plan, _ = await publish(service, [receiver.url])
    [slow] = await a.claim(1)
    await expire(db)
    assert await b.rescue() == 1
    [second] = await b.claim(1)
    assert await b.record_many([Outcome.of(second, DeliveryResult(succeeded=False, error="400"))]) == {
        second.id: "failed"
    }
    assert await service.redrive(plan_id=plan.id) == [second.id]
    [third] = await c.claim(1)
    late = Outcome.of(slow, DeliveryResult(succeeded=True, status_code=200, external_url="https://a/1"))
    assert await a.record_many([late]) == {slow.id: "succeeded"}
    # The third claim's own result moves nothing now, and its lease is not renewed.
    assert await c.record_many([Outcome.of(third, DeliveryResult(succeeded=True, status_code=200))]) == {}
    counters = await db.fetchrow(
        "SELECT status, queued_jobs, running_jobs, succeeded_jobs, failed_jobs FROM distribution_plans WHERE id = $1",
        plan.id,
    )
    assert dict(counters) == {
        "status": "succeeded",
        "queued_jobs": 0,
        "running_jobs": 0,
        "succeeded_jobs": 1,
        "failed_jobs": 0,
    }
    receipts = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert [(r.attempt, r.succeeded) for r in receipts] == [(1, True), (2, False), (3, True)]
    row = await db.fetchrow("SELECT claim_token, lease_expires_at, sending_at FROM distribution_jobs")
    assert tuple(row) == (None, None, None)


async def test_a_release_and_a_rescue_of_one_claim_move_the_job_once(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    a, b = Worker(runtime, name="a"), Worker(runtime, name="b")
    await publish(service, [receiver.url])
    [job] = await a.claim(1)
    await expire(db)
    assert await b.rescue() == 1  # counted, with a receipt
    assert await a.record_many([Outcome.release(job, "not started", 0.0)]) == {}
    row = await db.fetchrow("SELECT status, attempt FROM distribution_jobs")
    assert tuple(row) == ("queued", 1), "the release after the rescue took the attempt back"
    [again] = await b.claim(1)
    assert again.attempt == 2
