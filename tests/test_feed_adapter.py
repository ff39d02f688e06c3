"""RSS and Atom channels: entries kept in PostgreSQL, the feed file written whole and atomically,
read back with feedparser, and the same feed served as the MCP resource feed://{targetId}."""

from __future__ import annotations

from dataclasses import replace

import feedparser
import pytest
from mcp import Client

from queue_worker.worker import Worker
from tests.helpers import call
from wordclaw_mcp.config import Settings
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import CreateDistributionPlanInput, RegisterTargetInput, UpsertContentItemInput
from wordclaw_mcp.server import build_server
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


async def feed_target(service: DistributionService, channel_type: str, path: str = "news/feed.xml"):
    return await service.register_target(
        RegisterTargetInput(
            name=f"{channel_type}-feed",
            channel_type=channel_type,
            config={"path": path, "title": "News", "link": "https://example.com/", "description": "What shipped"},
        )
    )


async def item(service: DistributionService, n: int):
    return await service.upsert_content_item(
        UpsertContentItemInput(
            title=f"Post {n} & more",
            body=f"Body **{n}** <script>x()</script>",
            canonical_url=f"https://example.com/{n}",
        )
    )


async def deliver(service: DistributionService, worker: Worker, item_id, target_id) -> None:
    # Redelivering on purpose: the 5-minute duplicate rule would refuse it.
    request = CreateDistributionPlanInput(content_item_id=item_id, target_ids=[target_id], allow_duplicate=True)
    await service.create_distribution_plan(request)
    assert await worker.run_once() == 1


@pytest.mark.parametrize("channel_type", ["rss", "atom"])
async def test_a_feed_holds_one_entry_per_item_and_a_redelivery_does_not_duplicate_it(
    service: DistributionService, worker: Worker, settings: Settings, channel_type: str
) -> None:
    target = await feed_target(service, channel_type)
    first, second = await item(service, 1), await item(service, 2)
    await deliver(service, worker, first.id, target.id)
    await deliver(service, worker, second.id, target.id)
    await deliver(service, worker, first.id, target.id)  # again: the same entry, not a third

    folder = settings.feeds_path / "news"
    assert [p.name for p in folder.iterdir()] == ["feed.xml"], "a temporary file was left behind"
    parsed = feedparser.parse((folder / "feed.xml").read_bytes())
    assert parsed.bozo == 0, parsed.get("bozo_exception")
    assert parsed.feed.title == "News"
    assert [entry.title for entry in parsed.entries] == ["Post 2 & more", "Post 1 & more"]
    assert [entry.id for entry in parsed.entries] == [f"urn:uuid:{second.id}", f"urn:uuid:{first.id}"]
    assert parsed.entries[0].link == "https://example.com/2"
    content = parsed.entries[0].content[0].value if channel_type == "atom" else parsed.entries[0].description
    assert "<strong>2</strong>" in content and "<script>" not in content


async def test_the_feed_is_an_mcp_resource_and_other_targets_are_not(
    settings: Settings, service: DistributionService, worker: Worker
) -> None:
    target = await feed_target(service, "rss")
    first = await item(service, 1)
    await deliver(service, worker, first.id, target.id)
    hook = await service.register_target(
        RegisterTargetInput(name="hook", channel_type="webhook", config={"url": "https://example.com/in"})
    )
    async with Client(build_server(replace(settings, run_worker=False))) as client:
        read = await client.read_resource(f"feed://{target.id}")
        xml = read.contents[0].text
        assert feedparser.parse(xml).entries[0].title == "Post 1 & more"
        assert xml == (settings.feeds_path / "news" / "feed.xml").read_text()
        with pytest.raises(Exception) as refused:
            await client.read_resource(f"feed://{hook.id}")
        assert "TARGET_NOT_A_FEED" in str(refused.value)
        listed = await call(client, "list_targets")
    assert {t["channelType"] for t in listed["targets"]} == {"rss", "webhook"}


@pytest.mark.parametrize("path", ["../outside.xml", "/etc/feed.xml", "news/../../x.xml", ""])
async def test_a_feed_path_outside_the_feeds_folder_is_refused(service: DistributionService, path: str) -> None:
    with pytest.raises(DistributionError) as refused:
        await feed_target(service, "rss", path)
    assert refused.value.code == "INVALID_TARGET_CONFIG"


async def test_a_feed_in_a_folder_that_cannot_be_written_is_refused(
    service: DistributionService, settings: Settings
) -> None:
    settings.feeds_path.mkdir(parents=True, exist_ok=True)
    (settings.feeds_path / "taken").write_text("a file, not a folder")
    with pytest.raises(DistributionError) as refused:
        await feed_target(service, "atom", "taken/feed.xml")
    assert refused.value.code == "INVALID_TARGET_CONFIG" and "cannot be written" in refused.value.message
