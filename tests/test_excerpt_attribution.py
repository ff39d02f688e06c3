"""Review of issue 15: the README says that under an excerpt-only grant "no field carries more of
the item than that [the bound] ... (the attribution line is made from the cut metadata)". The
attribution line joins two cut metadata values, the author and the license, so the webhook's
`attribution` (and a feed's `rights`) carries up to twice the bound, plus "By " and " · "."""

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
