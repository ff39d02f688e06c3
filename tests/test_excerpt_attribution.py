"""Under an excerpt-only grant the attribution line ("By <author> · <license>"), which joins two
metadata values each cut to the bound, is itself within the bound (it once carried up to twice it,
found by a review of issue 15)."""

from __future__ import annotations

import pytest

from wordclaw_mcp.models import (
    CreateDistributionPlanInput,
    RegisterTargetInput,
    TransformPolicy,
    UpsertContentItemInput,
)
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

BOUND = 20


async def test_the_attribution_line_stays_within_the_grants_bound(service: DistributionService) -> None:
    owner, _ = await service.access.create_agent("owner", ["admin"], "acme")
    reseller, _ = await service.access.create_agent(
        "reseller", ["distribution:read", "distribution:write"], "acme"
    )
    item = await service.upsert_content_item(
        UpsertContentItemInput(
            title="T",
            body="Opening paragraph.\n\nThe rest.",
            metadata={"author": "Ada Lovelace and Charles Babbage", "license": "Proprietary, all rights reserved"},
        ),
        agent=owner,
    )
    hook = await service.register_target(
        RegisterTargetInput(name="hook", channel_type="webhook", config={"url": "https://example.com/in"}),
        agent=owner,
    )
    await service.access.grant(
        reseller.id, content_item_id=item.id, allow_redistribution=True, excerpt_only=True, max_excerpt_chars=BOUND
    )
    preview = await service.create_distribution_plan(
        CreateDistributionPlanInput(
            content_item_id=item.id,
            target_ids=[hook.id],
            dry_run=True,
            transform_policy=TransformPolicy(excerpt_only=True, include_attribution=True),
        ),
        agent=reseller,
    )
    data = preview.previews[0].payload["data"]
    assert all(len(value) <= BOUND for value in data["metadata"].values())
    assert len(data["attribution"]) <= BOUND, f"{len(data['attribution'])} characters: {data['attribution']!r}"
