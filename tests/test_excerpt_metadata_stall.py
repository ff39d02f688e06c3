"""No input stalls the server: under an excerpt-only grant the service cuts every metadata string
to the grant's bound (access.entitled_content) off the event loop, as it converts long items. An
item with a megabyte of short metadata strings once held the loop for about two seconds on a
reseller's dry run (found by a review of issue 15)."""

from __future__ import annotations

import time

import anyio
import pytest

from wordclaw_mcp.models import (
    CreateDistributionPlanInput,
    RegisterTargetInput,
    TransformPolicy,
    UpsertContentItemInput,
)
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

TAG = "a." * 13  # looks like a run of domain labels to the URL finder
TAGS = [TAG] * (1_000_000 // len(TAG))  # a megabyte


async def test_an_excerpt_grants_dry_run_on_an_item_with_a_megabyte_of_metadata_does_not_hold_the_loop(
    service: DistributionService,
) -> None:
    owner, _ = await service.access.create_agent("owner", ["admin"], "acme")
    reseller, _ = await service.access.create_agent("reseller", ["distribution:read", "distribution:write"], "acme")
    item = await service.upsert_content_item(
        UpsertContentItemInput(title="T", body="Opening.\n\nRest.", metadata={"tags": TAGS}), agent=owner
    )
    hook = await service.register_target(
        RegisterTargetInput(name="hook", channel_type="webhook", config={"url": "https://example.com/in"}),
        agent=owner,
    )
    await service.access.grant(
        reseller.id, content_item_id=item.id, allow_redistribution=True, excerpt_only=True, max_excerpt_chars=5
    )
    request = CreateDistributionPlanInput(
        content_item_id=item.id,
        target_ids=[hook.id],
        dry_run=True,
        transform_policy=TransformPolicy(excerpt_only=True, include_metadata=False),
    )
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
        await service.create_distribution_plan(request, agent=reseller)
        took = time.monotonic() - started
        done.set()
    assert longest < 0.2, f"the event loop was held for {longest:.2f} s (the dry run took {took:.2f} s)"
