"""RSS and Atom channels: entries kept in PostgreSQL, the feed file written whole and atomically,
read back with feedparser, and the same feed served as the MCP resource feed://{targetId}."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path, PurePosixPath

import anyio
import asyncpg
import feedparser
import pytest
from hypothesis import given
from hypothesis import settings as settings_for_hypothesis
from hypothesis import strategies as st
from mcp import Client

from queue_worker.adapters.feed import FeedAdapter, FeedConfig
from queue_worker.adapters.rss import RssAdapter
from queue_worker.worker import Worker
from tests.helpers import call, eventually
from tests.test_schema import build_at
from wordclaw_mcp import queries
from wordclaw_mcp.adapters import DeliveryTarget
from wordclaw_mcp.config import Settings
from wordclaw_mcp.database import apply_schema, connect, load_migrations
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import (
    Agent,
    CreateDistributionPlanInput,
    PlanRef,
    RegisterTargetInput,
    TransformPolicy,
    UpsertContentItemInput,
)
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

    folder = settings.feeds_path / "default" / "news"  # the local agent's tenant's folder
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
        assert xml == (settings.feeds_path / "default" / "news" / "feed.xml").read_text()
        with pytest.raises(Exception) as refused:
            await client.read_resource(f"feed://{hook.id}")
        assert "TARGET_NOT_A_FEED" in str(refused.value)
        listed = await call(client, "list_targets")
    assert {t["channelType"] for t in listed["targets"]} == {"rss", "webhook"}


@pytest.mark.parametrize(
    "path",
    ["../outside.xml", "/etc/feed.xml", "news/../../x.xml", "", "news\r\nx.xml", "x" * 300 + "/f.xml"],
)
async def test_a_feed_path_outside_the_feeds_folder_is_refused(service: DistributionService, path: str) -> None:
    with pytest.raises(DistributionError) as refused:
        await feed_target(service, "rss", path)
    assert refused.value.code == "INVALID_TARGET_CONFIG"


async def test_a_feed_in_a_folder_that_cannot_be_written_is_refused(
    service: DistributionService, settings: Settings
) -> None:
    settings.feeds_path.mkdir(parents=True, exist_ok=True)
    (settings.feeds_path / "default").mkdir()
    (settings.feeds_path / "default" / "taken").write_text("a file, not a folder")
    with pytest.raises(DistributionError) as refused:
        await feed_target(service, "atom", "taken/feed.xml")
    assert refused.value.code == "INVALID_TARGET_CONFIG" and "cannot be written" in refused.value.message


# --- a feed's file is its own: per tenant, unique, never through a link ----------------------------

ALL_SCOPES = ["distribution:read", "distribution:write", "targets:admin", "content:write"]


async def tenant_agent(service: DistributionService, tenant: str) -> Agent:
    agent, _key = await service.access.create_agent(f"{tenant}-bot", ALL_SCOPES, tenant)
    return agent


async def publish_as(service: DistributionService, worker: Worker, agent: Agent, target_id, title: str) -> None:
    made = await service.upsert_content_item(UpsertContentItemInput(title=title, body="b"), agent=agent)
    request = CreateDistributionPlanInput(content_item_id=made.id, target_ids=[target_id])
    await service.create_distribution_plan(request, agent=agent)
    assert await worker.run_once() == 1


async def test_two_tenants_registering_one_path_each_get_a_file_of_their_own(
    service: DistributionService, worker: Worker, settings: Settings
) -> None:
    acme, globex = await tenant_agent(service, "acme"), await tenant_agent(service, "globex")
    config = {"path": "shared/news.xml", "link": "https://example.com/"}
    mine = await service.register_target(
        RegisterTargetInput(name="news", channel_type="rss", config={**config, "title": "Acme"}), agent=acme
    )
    theirs = await service.register_target(
        RegisterTargetInput(name="news", channel_type="rss", config={**config, "title": "Globex"}), agent=globex
    )
    assert (mine.config["file"], theirs.config["file"]) == ("acme/shared/news.xml", "globex/shared/news.xml")
    [listed] = (await service.list_targets(agent=acme)).targets
    assert listed.config["file"] == "acme/shared/news.xml" and listed.config["path"] == "shared/news.xml"

    await publish_as(service, worker, acme, mine.id, "Acme's news")
    await publish_as(service, worker, globex, theirs.id, "Globex's news")
    acme_feed = feedparser.parse((settings.feeds_path / "acme" / "shared" / "news.xml").read_bytes())
    globex_feed = feedparser.parse((settings.feeds_path / "globex" / "shared" / "news.xml").read_bytes())
    assert (acme_feed.feed.title, [entry.title for entry in acme_feed.entries]) == ("Acme", ["Acme's news"])
    assert (globex_feed.feed.title, [entry.title for entry in globex_feed.entries]) == ("Globex", ["Globex's news"])


@pytest.mark.parametrize("spelling", ["news/feed.xml", "news//feed.xml", "./news/./feed.xml", "News/FEED.xml"])
async def test_a_file_a_feed_of_the_tenant_writes_is_refused_in_any_spelling(
    service: DistributionService, db: asyncpg.Connection, spelling: str
) -> None:
    first = await feed_target(service, "rss", "news/feed.xml")
    await db.execute("UPDATE distribution_targets SET active = false WHERE id = $1", first.id)  # still its file
    with pytest.raises(DistributionError) as refused:
        await service.register_target(
            RegisterTargetInput(
                name="second", channel_type="atom", config={"path": spelling, "title": "T", "link": "https://e.com/"}
            )
        )
    assert refused.value.code == "FEED_PATH_TAKEN" and "default/" in refused.value.message
    assert "another path" in refused.value.remediation
    assert await db.fetchval("SELECT count(*) FROM distribution_targets") == 1


@pytest.mark.parametrize("file", ["globex/shared/news.xml", "default/news.xml", "../../etc/passwd"])
async def test_a_caller_cannot_choose_the_file(service: DistributionService, file: str) -> None:
    config = {"path": "news.xml", "title": "T", "link": "https://e.com/", "file": file}
    with pytest.raises(DistributionError) as refused:
        await service.register_target(RegisterTargetInput(name="sneaky", channel_type="rss", config=config))
    assert refused.value.code == "INVALID_TARGET_CONFIG" and "file is chosen by WordClaw" in refused.value.message


@settings_for_hypothesis(max_examples=300, deadline=None)
@given(
    tenants=st.lists(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True), min_size=2, max_size=2, unique=True),
    path=st.text(st.sampled_from("aZ./\\_-é\x00"), min_size=1, max_size=30),
)
def test_no_path_makes_a_tenants_file_leave_its_folder_or_meet_another_tenants(tenants: list[str], path: str) -> None:
    """Whatever path an agent gives: refused, or a file inside its tenant's folder that no other
    tenant's file can equal, in any case."""
    adapter = RssAdapter()
    try:
        given = FeedConfig.model_validate({"path": path, "title": "T", "link": "https://e.com/"})
    except ValueError:
        return
    files = [adapter.config_for_tenant(given, tenant).file for tenant in tenants]
    for tenant, file in zip(tenants, files, strict=True):
        parts = PurePosixPath(file).parts
        assert parts[0] == tenant and len(parts) >= 2 and ".." not in parts and "." not in parts
        assert PurePosixPath(file) == PurePosixPath(tenant) / path
    assert files[0].lower() != files[1].lower()


async def test_a_tenant_folder_that_is_a_link_is_refused_at_registration_and_delivery(
    service: DistributionService, worker: Worker, settings: Settings, db: asyncpg.Connection
) -> None:
    feeds = settings.feeds_path
    (feeds / "globex" / "news").mkdir(parents=True)
    (feeds / "globex" / "news" / "feed.xml").write_text("globex's feed")
    (feeds / "default").symlink_to(feeds / "globex")
    with pytest.raises(DistributionError) as refused:
        await feed_target(service, "rss")
    assert refused.value.code == "INVALID_TARGET_CONFIG" and "symbolic link" in refused.value.message

    # A link made after registration: the delivery fails for good, and writes nothing through it.
    (feeds / "default").unlink()
    target = await feed_target(service, "rss")
    (feeds / "default" / "news").rmdir()
    (feeds / "default").rmdir()
    (feeds / "default").symlink_to(feeds / "globex")
    await deliver(service, worker, (await item(service, 1)).id, target.id)
    job = await db.fetchrow("SELECT status, last_error FROM distribution_jobs")
    assert job["status"] == "failed" and "symbolic link" in job["last_error"]
    assert (feeds / "globex" / "news" / "feed.xml").read_text() == "globex's feed"


async def test_an_entry_whose_file_cannot_be_written_is_not_kept(
    service: DistributionService, worker: Worker, settings: Settings, db: asyncpg.Connection
) -> None:
    target = await feed_target(service, "atom")
    (settings.feeds_path / "default" / "news").rmdir()
    (settings.feeds_path / "default" / "news").write_text("a file where the folder was")
    await deliver(service, worker, (await item(service, 1)).id, target.id)
    job = await db.fetchrow("SELECT status, last_error FROM distribution_jobs")
    assert job["status"] == "queued" and "could not be written" in job["last_error"]
    assert await db.fetchval("SELECT count(*) FROM feed_items") == 0, "the database and the file disagree"


# --- two deliveries to one feed at once -------------------------------------------------------------


async def race_two_deliveries(
    service: DistributionService, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], int]:
    """Deliver two items to one feed so that they overlap where they can race: the first writes its
    file only once the second has written its own or is waiting on the feed's lock. Returns the
    titles in the file and the entries in the table."""
    target = await feed_target(service, "rss")
    adapter = service.adapters.get("rss")
    assert isinstance(adapter, FeedAdapter)
    delivery = DeliveryTarget(id=target.id, name=target.name, config=target.config)
    payloads = [adapter.transform(await item(service, n), TransformPolicy()) for n in (1, 2)]
    first_rendered, second_wrote = anyio.Event(), anyio.Event()
    original = FeedAdapter._write

    async def second_waits_on_the_lock() -> bool:
        return (
            await db.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            > 0
        )

    async def held_write(self: FeedAdapter, file: Path, xml: str) -> None:
        if not first_rendered.is_set():
            first_rendered.set()
            await eventually(lambda: _either(second_wrote, second_waits_on_the_lock), within=20)
            await original(self, file, xml)
        else:
            await original(self, file, xml)
            second_wrote.set()

    monkeypatch.setattr(FeedAdapter, "_write", held_write)
    results = []

    async def run(payload: dict) -> None:
        results.append(await adapter.deliver(payload, delivery))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, payloads[0])
            await first_rendered.wait()
            tg.start_soon(run, payloads[1])
    assert all(result.succeeded for result in results), results
    parsed = feedparser.parse((service.settings.feeds_path / target.config["file"]).read_bytes())
    return [entry.title for entry in parsed.entries], await db.fetchval("SELECT count(*) FROM feed_items")


async def _either(event: anyio.Event, check: Callable[[], Awaitable[bool]]) -> bool:
    return event.is_set() or await check()


async def test_two_deliveries_to_one_feed_at_once_both_reach_the_file(
    service: DistributionService, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    titles, stored = await race_two_deliveries(service, db, monkeypatch)
    assert stored == 2 and sorted(titles) == ["Post 1 & more", "Post 2 & more"]


async def test_without_the_feed_lock_the_race_loses_an_entry(
    service: DistributionService, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race above is real: with the lock taken away, the file keeps one entry of the two."""
    monkeypatch.setattr(queries, "LOCK_FEED", "SELECT $1::uuid")
    titles, stored = await race_two_deliveries(service, db, monkeypatch)
    assert stored == 2 and titles == ["Post 1 & more"]


# --- the feed's own URL -----------------------------------------------------------------------------

FEED_URL = "https://example.com/news/feed.xml"


@pytest.mark.parametrize("channel_type", ["rss", "atom"])
@pytest.mark.parametrize("feed_url", [FEED_URL, None])
async def test_a_feed_url_is_the_feeds_self_link_and_the_receipts_external_url(
    service: DistributionService, worker: Worker, settings: Settings, channel_type: str, feed_url: str | None
) -> None:
    config = {"path": "news/feed.xml", "title": "News", "link": "https://example.com/"}
    target = await service.register_target(
        RegisterTargetInput(
            name="feed", channel_type=channel_type, config={**config, **({"feedUrl": feed_url} if feed_url else {})}
        )
    )
    made = await item(service, 1)
    plan = await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=made.id, target_ids=[target.id])
    )
    assert await worker.run_once() == 1

    parsed = feedparser.parse((settings.feeds_path / "default" / "news" / "feed.xml").read_bytes())
    assert parsed.bozo == 0, parsed.get("bozo_exception")
    links = {(link.rel, link.href) for link in parsed.feed.links}
    assert parsed.feed.link == "https://example.com/", "the feed's link is the site, not the feed"
    assert (("self", FEED_URL) in links) == bool(feed_url), links
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.succeeded and receipt.external_url == (feed_url or "https://example.com/")
    assert receipt.raw_meta["file"] == "default/news/feed.xml"


# --- feeds registered before tenants had folders (migration 0014) ----------------------------------


async def test_the_migration_keeps_old_feeds_files_and_moves_the_newer_of_those_that_shared_one(
    empty_database_url: str,
) -> None:
    conn = await connect(empty_database_url)
    try:
        await build_at(conn, [m for m in load_migrations() if m.version < 14])
        await conn.execute("INSERT INTO tenants (id) VALUES ('acme'), ('globex')")
        feeds = [  # (label, tenant, path), oldest first
            ("first", "default", "news.xml"),
            ("same-file", "acme", "./news.xml"),  # one file with the first: moves to acme/
            ("same-again", "acme", "news.xml"),  # acme/news.xml is taken now: a folder of its own
            ("nested", "globex", "globex/x.xml"),
            ("alone", "globex", "x.xml"),
            ("case", "globex", "X.xml"),  # one file with 'alone' where case does not count; globex/x.xml taken
            ("other-tenant", "default", "globex//x.xml"),  # one file with 'nested': to default/
        ]
        ids = {}
        for n, (label, tenant, path) in enumerate(feeds):
            ids[label] = await conn.fetchval(
                "INSERT INTO distribution_targets (name, channel_type, config_json, tenant_id, created_at) "
                "VALUES ($1, 'rss', jsonb_build_object('path', $2::text, 'title', 'T'), $3, "
                "now() - interval '1 day' + $4 * interval '1 minute') RETURNING id",
                label,
                path,
                tenant,
                n,
            )
        hook = await conn.fetchval(
            "INSERT INTO distribution_targets (name, channel_type, config_json, tenant_id) "
            "VALUES ('hook', 'webhook', '{\"url\": \"https://e.com/\"}', 'default') RETURNING id"
        )
        await apply_schema(conn)
        files = {
            row["name"]: row["config"]
            for row in await conn.fetch("SELECT name, config_json AS config FROM distribution_targets")
        }
    finally:
        await conn.close()
    assert {label: files[label]["file"] for label in ids} == {
        "first": "news.xml",
        "same-file": "acme/news.xml",
        "same-again": f"acme/{ids['same-again']}/news.xml",
        "nested": "globex/x.xml",
        "alone": "x.xml",
        "case": f"globex/{ids['case']}/X.xml",
        "other-tenant": "default/globex/x.xml",
    }
    assert files["same-file"]["path"] == "./news.xml", "the path the agent gave is kept as it was"
    assert "file" not in files["hook"] and hook
