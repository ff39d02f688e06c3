"""The X channel against a faithful local API (tests/fake_x.py): posts counted as X counts, and
never sent twice, since X has no idempotency key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from queue_worker.worker import Worker
from tests.fake_x import FakeX
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import CreateDistributionPlanInput, PlanRef, RegisterTargetInput, UpsertContentItemInput
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

LINK = "https://example.com/posts/" + "long-slug-" * 8


@pytest.fixture
def x() -> Iterator[FakeX]:
    with FakeX() as fake:
        yield fake


async def publish(service: DistributionService, x: FakeX, body: str = "We shipped it."):
    item = await service.upsert_content_item(UpsertContentItemInput(title="Launch day", body=body, canonical_url=LINK))
    target = await service.register_target(
        RegisterTargetInput(
            name=f"x-{item.id.hex[:6]}",
            channel_type="x",
            config={"baseUrl": x.base_url},
            secrets={"accessToken": x.account.token},
        )
    )
    return await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id])
    )


async def test_an_item_is_posted_and_the_receipt_links_to_the_post(
    service: DistributionService, worker: Worker, x: FakeX
) -> None:
    plan = await publish(service, x)
    await worker.run_once()
    [post] = x.account.posts
    assert post["text"] == f"Launch day\n\nWe shipped it.\n\n{LINK}"
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.succeeded and receipt.status_code == 201
    assert receipt.external_url == f"https://x.com/i/web/status/{post['id']}"


async def test_a_long_item_is_cut_to_280_as_x_weighs_it_keeping_the_link(
    service: DistributionService, worker: Worker, x: FakeX
) -> None:
    plan = await publish(service, x, body=" ".join(f"word{i}" for i in range(200)))
    await worker.run_once()
    assert (await service.get_plan(PlanRef(plan_id=plan.id))).status == "succeeded"
    [post] = x.account.posts
    assert post["text"].endswith(f"…\n\n{LINK}") and len(post["text"]) > 280, "the URL counts 23, not its length"


async def test_no_answer_after_sending_ends_the_job_outcome_unknown_and_it_is_not_sent_again(
    settings: Settings, x: FakeX
) -> None:
    async with Runtime.open(replace(settings, delivery_timeout=0.5)) as runtime:
        service, worker = DistributionService(runtime), Worker(runtime)
        plan = await publish(service, x)
        x.account.hang = True
        await worker.run_once()
        [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == "failed" and job.attempt == 1
    assert job.last_error.startswith("DELIVERY_OUTCOME_UNKNOWN") and "redrive" in job.last_error
    assert x.account.requests == 1 and len(x.account.posts) == 1


@pytest.mark.parametrize(
    ("setup", "status", "job_status", "says"),
    [
        (lambda a: setattr(a, "token", "revoked"), 401, "failed", "accessToken"),
        (
            lambda a: a.posts.append({"id": "1", "text": f"Launch day\n\nWe shipped it.\n\n{LINK}"}),
            403,
            "failed",
            "duplicate",
        ),
        (lambda a: setattr(a, "remaining", 0), 429, "queued", "Too Many Requests"),
    ],
)
async def test_xs_refusals_become_the_right_outcome(
    service: DistributionService, worker: Worker, x: FakeX, setup, status: int, job_status: str, says: str
) -> None:
    plan = await publish(service, x)
    setup(x.account)  # after registration, as a token is revoked or a limit spent later
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == job_status
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.status_code == status and says in receipt.error_message
    assert "x-token" not in json.dumps(receipt.model_dump(mode="json"))
    if status == 429:
        [target] = (await service.list_targets()).targets
        assert target.suspended_until is not None
        assert timedelta(minutes=14) < target.suspended_until - datetime.now(UTC) <= timedelta(minutes=15, seconds=1)
