"""A job claimed ahead whose plan is cancelled: the worker hears of a cancel through LISTEN/NOTIFY
or, should the notification be lost, its next heartbeat. On a channel that cannot take a request
twice (X) it also asks just before sending (MARK_SENDING), so a cancel that has committed never
ends in a post, heard of or not. (Found by a review of issue 15.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace

import anyio
import pytest

from queue_worker.worker import Worker
from tests.fake_x import FakeX
from tests.helpers import eventually
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import CreateDistributionPlanInput, PlanRef, RegisterTargetInput, UpsertContentItemInput
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


@pytest.fixture
def x() -> Iterator[FakeX]:
    with FakeX() as fake:
        yield fake


async def plan_to(service: DistributionService, channel: str, config: dict, secrets: dict | None, title: str):
    item = await service.upsert_content_item(UpsertContentItemInput(title=title, body="Body."))
    target = await service.register_target(
        RegisterTargetInput(name=f"{channel}-{item.id.hex[:6]}", channel_type=channel, config=config, secrets=secrets)
    )
    return await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id])
    )


async def test_an_x_job_claimed_before_its_plan_was_cancelled_is_not_posted(
    service: DistributionService, worker: Worker, x: FakeX
) -> None:
    """The cancel has committed before the attempt starts: MARK_SENDING could see it, and does not."""
    plan = await plan_to(service, "x", {"baseUrl": x.base_url}, {"accessToken": x.account.token}, "Cancelled")
    [job] = await worker.claim(1)
    await service.cancel_plan(PlanRef(plan_id=plan.id))
    done = await worker.attempt(job)
    if done is not None:
        await worker.record_many([done])
    assert x.account.posts == [], "a plan cancelled before its X attempt started was posted"
    [row] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert row.status != "succeeded"


async def test_a_claimed_ahead_x_job_whose_cancel_notification_was_lost_is_not_posted(
    settings: Settings, receiver: WebhookReceiver, x: FakeX
) -> None:
    """The running worker: one slot, busy on a webhook held at a gate; the X job waits, claimed
    ahead. The LISTEN connection drops (a database restart, a proxy), so the cancel's NOTIFY is
    lost; the heartbeat, the fallback, is 10 s away. The slot frees and the X job goes out."""
    gate = threading.Event()
    receiver.behaviour.gate = gate
    async with Runtime.open(replace(settings, worker_concurrency=1, worker_batch_size=2)) as runtime:
        service = DistributionService(runtime)
        await plan_to(service, "webhook", {"url": receiver.url}, None, "First")
        cancelled = await plan_to(
            service, "x", {"baseUrl": x.base_url}, {"accessToken": x.account.token}, "Second, cancelled"
        )
        worker = Worker(runtime, name="ahead")
        async with runtime.pool.acquire() as db, anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await anyio.to_thread.run_sync(receiver.wait_for, 1, 10)
            assert [job.channel_type for job in worker._ready] == ["x"], "the X job waits, claimed ahead"
            listener = runtime.notifications._conn
            assert listener is not None
            await db.execute("SELECT pg_terminate_backend($1)", listener.get_server_pid())
            await eventually(lambda: _closed(runtime), within=5)
            await service.cancel_plan(PlanRef(plan_id=cancelled.id))
            gate.set()
            await eventually(lambda: _idle(worker), within=10)
            worker.stop()
        [row] = (await service.get_plan(PlanRef(plan_id=cancelled.id))).jobs
    assert x.account.posts == [], f"posted after its plan was cancelled (job ended {row.status})"


async def _closed(runtime: Runtime) -> bool:
    return not runtime.notifications.connected


async def _idle(worker: Worker) -> bool:
    return worker._holding == 0 and not worker._ready
