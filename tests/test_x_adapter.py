"""The X channel against a faithful local API (tests/fake_x.py): posts counted as X counts, and
never sent twice, since X has no idempotency key."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from queue_worker.worker import Worker
from tests.fake_x import FakeX
from tests.helpers import eventually
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import (
    CreateDistributionPlanInput,
    PlanRef,
    RegisterTargetInput,
    RetryPlanInput,
    UpsertContentItemInput,
)
from wordclaw_mcp.receiver import WebhookReceiver
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


@pytest.mark.parametrize("status", [500, 503, 504])
async def test_a_5xx_after_sending_ends_the_job_outcome_unknown_and_it_is_not_sent_again(
    service: DistributionService, worker: Worker, x: FakeX, db, status: int
) -> None:
    """X's 5xx do not say that nothing was posted (a 504 comes from a gateway whose backend may go
    on to make the post), and X has no idempotency key: the job is not retried by itself."""
    plan = await publish(service, x)
    x.account.error_after_posting = status
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == "failed" and job.last_error.startswith("DELIVERY_OUTCOME_UNKNOWN"), job
    assert f"HTTP {status}" in job.last_error and "redrive" in job.last_error
    await db.execute("UPDATE distribution_jobs SET next_attempt_at = now() - interval '1 day'")
    await worker.run_once()
    assert x.account.requests == 1 and len(x.account.posts) == 1


async def test_a_shutdown_that_interrupts_a_post_in_flight_does_not_send_it_again(
    settings: Settings, x: FakeX
) -> None:
    """Past the shutdown grace the attempt is cancelled with its request out: on X that may be a
    post, so the job ends DELIVERY_OUTCOME_UNKNOWN instead of going back to the queue."""
    x.account.hang = True
    async with Runtime.open(replace(settings, shutdown_grace=0.5)) as runtime:
        service, worker = DistributionService(runtime), Worker(runtime)
        plan = await publish(service, x)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await eventually(lambda: _true(x.account.requests))
                worker.stop()
        [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
        assert job.status == "failed" and job.last_error.startswith("DELIVERY_OUTCOME_UNKNOWN"), job
        assert "shut down" in job.last_error
        x.account.hang = False
        await Worker(runtime, name="next").run_once()
    assert x.account.requests == 1 and len(x.account.posts) == 1


async def test_a_killed_workers_post_is_not_sent_again_but_one_it_never_started_is(
    service: DistributionService, x: FakeX, db
) -> None:
    """Two X jobs claimed by a worker that then dies: it had begun sending one (its request is at X)
    and not the other. The rescue ends the first DELIVERY_OUTCOME_UNKNOWN and requeues the second."""
    first = await publish(service, x)
    second = await publish(service, x, body="Another one.")
    dead, rescuer = Worker(service.runtime, name="dead"), Worker(service.runtime, name="rescuer")
    claimed = {job.plan_id: job for job in await dead.claim(2)}
    x.account.hang = True
    async with anyio.create_task_group() as tg:
        tg.start_soon(dead.attempt, claimed[first.id])
        await eventually(lambda: _true(x.account.requests))
        tg.cancel_scope.cancel()  # the worker dies with the post made and unanswered
    x.account.hang = False
    await db.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 second'")
    assert await rescuer.rescue() == 2
    await rescuer.run_once()
    [lost] = (await service.get_plan(PlanRef(plan_id=first.id))).jobs
    assert lost.status == "failed" and lost.last_error.startswith("DELIVERY_OUTCOME_UNKNOWN"), lost
    assert (await service.get_plan(PlanRef(plan_id=second.id))).status == "succeeded"
    assert Counter(x.account.asked) == {post["text"]: 1 for post in x.account.posts} and len(x.account.posts) == 2
    receipts = (await service.get_receipts(PlanRef(plan_id=first.id))).receipts
    assert [(r.attempt, r.succeeded) for r in receipts] == [(1, False)]
    assert receipts[0].error_message.startswith("DELIVERY_OUTCOME_UNKNOWN")


async def _true(value: object) -> bool:
    return bool(value)


async def test_retrying_a_plan_leaves_a_post_that_may_exist_alone_unless_it_is_named(
    service: DistributionService, worker: Worker, x: FakeX, receiver: WebhookReceiver
) -> None:
    """An agent retrying a plan's failed webhook must not post to X again: a job that ended
    DELIVERY_OUTCOME_UNKNOWN is driven again only when named, once someone checked."""
    item = await service.upsert_content_item(UpsertContentItemInput(title="Both", body="Body."))
    hook = await service.register_target(
        RegisterTargetInput(name="hook", channel_type="webhook", config={"url": receiver.url})
    )
    on_x = await service.register_target(
        RegisterTargetInput(
            name="x", channel_type="x", config={"baseUrl": x.base_url}, secrets={"accessToken": x.account.token}
        )
    )
    plan = await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[hook.id, on_x.id])
    )
    receiver.behaviour.status = 400  # refused: fails at once
    x.account.error_after_posting = 503
    await worker.run_once()
    jobs = {job.target_id: job for job in (await service.get_plan(PlanRef(plan_id=plan.id))).jobs}
    assert jobs[on_x.id].last_error.startswith("DELIVERY_OUTCOME_UNKNOWN") and jobs[hook.id].status == "failed"

    retried = await service.retry_plan(RetryPlanInput(plan_id=plan.id))
    statuses = {job.target_id: job.status for job in retried.jobs}
    assert statuses == {hook.id: "queued", on_x.id: "failed"}
    named = await service.retry_plan(RetryPlanInput(plan_id=plan.id, job_ids=[jobs[on_x.id].id]))
    assert {job.target_id: job.status for job in named.jobs}[on_x.id] == "queued"
