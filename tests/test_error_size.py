"""Review of issue 15 ("errors every MCP client can read"): a POLICY_DOES_NOT_FIT error quotes the
whole tail it could not fit, so a long UTM value (nothing bounds one but the request's size) comes
back inside the error's message whole: a megabyte of error text for an agent to read."""

from __future__ import annotations

import pytest

from tests.fake_x import FakeX
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import (
    CreateDistributionPlanInput,
    RegisterTargetInput,
    TransformPolicy,
    UpsertContentItemInput,
)
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


async def test_a_tail_that_cannot_fit_is_not_echoed_whole_in_the_error(service: DistributionService) -> None:
    with FakeX() as x:
        item = await service.upsert_content_item(
            UpsertContentItemInput(title="T", body="Body.", canonical_url="https://example.com/p")
        )
        target = await service.register_target(
            RegisterTargetInput(
                name="x", channel_type="x", config={"baseUrl": x.base_url}, secrets={"accessToken": "t"}
            )
        )
        with pytest.raises(DistributionError) as refused:
            await service.create_distribution_plan(
                CreateDistributionPlanInput(
                    content_item_id=item.id,
                    target_ids=[target.id],
                    dry_run=True,
                    transform_policy=TransformPolicy(utm={"campaign": "spring-" * 150_000}),
                )
            )
    assert refused.value.code == "POLICY_DOES_NOT_FIT"
    assert len(refused.value.message) < 10_000, f"the message is {len(refused.value.message):,} characters"
