"""Errors an agent can read: a POLICY_DOES_NOT_FIT error names the tail it could not fit without
quoting it whole (it quoted a megabyte of UTM value back, found by a review of issue 15), and UTM
values are bounded."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

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
                    # 30 hashtags of 100 characters: 3,000 to keep whole in a post of 280.
                    transform_policy=TransformPolicy(hashtags=[f"t{n:02}" + "a" * 97 for n in range(30)]),
                )
            )
    assert refused.value.code == "POLICY_DOES_NOT_FIT"
    assert len(refused.value.message) < 400, f"the message is {len(refused.value.message):,} characters"


def test_a_utm_value_is_at_most_500_characters() -> None:
    with pytest.raises(ValidationError):
        TransformPolicy(utm={"campaign": "spring-" * 150_000})
