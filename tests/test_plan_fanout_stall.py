"""No input stalls the server, in a real plan as in a dry run: the largest allowed item (a body of
1,000,000 characters) planned to the most targets a plan may name (100 webhooks). Each distinct
payload goes to PostgreSQL once; encoding the same megabyte once per job held the event loop
(found by a review of issue 15)."""

from __future__ import annotations

import time

import anyio
import pytest

from wordclaw_mcp.models import CreateDistributionPlanInput, RegisterTargetInput, UpsertContentItemInput
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


async def test_a_plan_of_the_largest_item_to_a_hundred_targets_does_not_hold_the_loop(
    service: DistributionService,
) -> None:
    item = await service.upsert_content_item(UpsertContentItemInput(title="T", body="word " * 200_000))
    targets = [
        await service.register_target(
            RegisterTargetInput(name=f"hook-{n}", channel_type="webhook", config={"url": f"https://example.com/{n}"})
        )
        for n in range(100)
    ]
    request = CreateDistributionPlanInput(content_item_id=item.id, target_ids=[t.id for t in targets])
    longest = 0.0
    done = anyio.Event()

    async def probe() -> None:
        nonlocal longest
        while not done.is_set():
            before = time.monotonic()
            await anyio.sleep(0.01)
            longest = max(longest, time.monotonic() - before)

    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        await anyio.sleep(0.05)
        started = time.monotonic()
        await service.create_distribution_plan(request)
        took = time.monotonic() - started
        done.set()
    assert took < 2.0 and longest < 0.2, f"the event loop was held for {longest:.2f} s; the plan took {took:.2f} s"
