"""The statement-level deactivation trigger when one statement deactivates many targets at once
(an operator's UPDATE), with plans spanning several of them: each queued job fails with its
target's reason, and the plans' counters stay true."""

from __future__ import annotations

import asyncpg
import pytest

from tests.helpers import publish
from wordclaw_mcp.models import PlanRef
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


async def test_one_statement_deactivating_many_targets_fails_all_their_queued_jobs_with_each_reason(
    service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    plans = []
    for _ in range(20):
        plan, targets = await publish(service, [receiver.url + f"?{i}" for i in range(5)])
        plans.append((plan, targets))
    every = [target for _, targets in plans for target in targets]
    doomed = every[::2]
    await db.execute(
        "UPDATE distribution_targets SET active = false, "
        "deactivated_reason = CASE WHEN id = $2 THEN 'GONE_ONE' END WHERE id = ANY ($1::uuid[])",
        doomed,
        doomed[0],
    )
    rows = await db.fetch("SELECT target_id, status, last_error FROM distribution_jobs")
    for row in rows:
        if row["target_id"] in doomed:
            assert row["status"] == "failed"
            expected = "GONE_ONE" if row["target_id"] == doomed[0] else "TARGET_INACTIVE"
            assert row["last_error"].startswith(expected)
        else:
            assert row["status"] == "queued"
    for plan, _ in plans:
        counted = await db.fetchrow(
            "SELECT queued_jobs, failed_jobs, status FROM distribution_plans WHERE id = $1", plan.id
        )
        jobs = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
        assert counted["queued_jobs"] == sum(job.status == "queued" for job in jobs)
        assert counted["failed_jobs"] == sum(job.status == "failed" for job in jobs)
