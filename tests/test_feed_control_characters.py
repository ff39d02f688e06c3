"""Text XML cannot hold, on the feed channels (found by a review of issue 15).

XML 1.0 allows no control characters but tab, line feed and carriage return. A content item may
hold others (a vertical tab or an ESC pasted from a terminal or a word processor: JSON and
PostgreSQL take them), and so may a feed target's title. feedgen (lxml) then refuses to build the
feed with a ValueError, which the worker takes for an adapter crash: "The rss adapter failed:
ValueError.", retried on the schedule for the whole budget although it can never succeed, and the
agent is told nothing it can act on. Any other channel delivers the same item.
"""

from __future__ import annotations

import re

import asyncpg
import pytest

from queue_worker.worker import Worker
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import CreateDistributionPlanInput, PlanRef, RegisterTargetInput, UpsertContentItemInput
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

CODED = re.compile(r"^[A-Z][A-Z_]+: ")


@pytest.mark.parametrize("channel_type", ["rss", "atom"])
@pytest.mark.parametrize("where", ["title", "body"])
async def test_an_item_with_a_control_character_is_published_or_refused_with_a_code_not_retried(
    service: DistributionService, worker: Worker, db: asyncpg.Connection, channel_type: str, where: str
) -> None:
    text = "Tabs\x0bmade by a word processor, and an ESC \x1b[0m"
    item = await service.upsert_content_item(
        UpsertContentItemInput(title=text if where == "title" else "Title", body=text if where == "body" else "Body")
    )
    target = await service.register_target(
        RegisterTargetInput(
            name="feed",
            channel_type=channel_type,
            config={"path": "feed.xml", "title": "News", "link": "https://example.com/"},
        )
    )
    try:
        plan = await service.create_distribution_plan(
            CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id])
        )
    except DistributionError:
        return  # refused up front, with a code: fine
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    if job.status == "succeeded":
        return
    assert job.status == "failed" and CODED.match(job.last_error or ""), (
        f"{channel_type} job left {job.status} after attempt {job.attempt}: {job.last_error!r}"
    )


async def test_a_feed_target_whose_title_xml_cannot_hold_is_refused_at_registration(
    service: DistributionService,
) -> None:
    with pytest.raises(DistributionError):
        await service.register_target(
            RegisterTargetInput(
                name="feed",
                channel_type="rss",
                config={"path": "feed.xml", "title": "News\x0b", "link": "https://example.com/"},
            )
        )


async def test_a_feed_whose_stored_title_xml_cannot_hold_is_still_read_through_mcp(
    settings, service: DistributionService, db: asyncpg.Connection
) -> None:
    """A config stored before such titles were refused is read, without the character: not a
    TARGET_NOT_FOUND for a target that exists (the resource once took lxml's ValueError for a
    malformed id)."""
    from dataclasses import replace

    from mcp import Client

    from wordclaw_mcp.server import build_server

    target = await service.register_target(
        RegisterTargetInput(
            name="feed", channel_type="rss", config={"path": "f.xml", "title": "News", "link": "https://e.com/"}
        )
    )
    await db.execute(
        "UPDATE distribution_targets SET config_json = jsonb_set(config_json, '{title}', to_jsonb($2::text)) "
        "WHERE id = $1",
        target.id,
        "News\x0b",
    )
    async with Client(build_server(replace(settings, run_worker=False))) as client:
        read = await client.read_resource(f"feed://{target.id}")
    assert "<title>News</title>" in read.contents[0].text
