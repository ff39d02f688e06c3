"""An X attempt that may have posted, recorded after its target was deactivated (another job's
410, an operator), keeps DELIVERY_OUTCOME_UNKNOWN and its remediation (check the account); it
once ended TARGET_INACTIVE, "this job will not be delivered", while the post may exist."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest

from queue_worker.worker import Worker
from tests.fake_x import FakeX
from wordclaw_mcp.models import CreateDistributionPlanInput, PlanRef, RegisterTargetInput, UpsertContentItemInput
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


@pytest.fixture
def x() -> Iterator[FakeX]:
    with FakeX() as fake:
        yield fake


async def test_a_post_that_may_exist_is_not_reported_as_never_delivered(
    service: DistributionService, worker: Worker, x: FakeX, db: asyncpg.Connection
) -> None:
    item = await service.upsert_content_item(UpsertContentItemInput(title="Launch", body="We shipped it."))
    target = await service.register_target(
        RegisterTargetInput(
            name="x", channel_type="x", config={"baseUrl": x.base_url}, secrets={"accessToken": x.account.token}
        )
    )
    plan = await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id])
    )
    [job] = await worker.claim(1)
    x.account.error_after_posting = 504  # the post is made, the gateway answers 504
    await db.execute("UPDATE distribution_targets SET active = false WHERE id = $1", target.id)
    done = await worker.attempt(job)
    assert done is not None
    await worker.record_many([done])
    [row] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert len(x.account.posts) == 1
    assert row.last_error.startswith("DELIVERY_OUTCOME_UNKNOWN"), row.last_error
