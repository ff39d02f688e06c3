"""An excerpt-only grant bounds everything a payload carries of the item's text, on every channel.

Under a grant with ``excerptOnly`` (and ``maxExcerptChars``), no field of any channel's payload
(body, summary, metadata, HTML, plain text, a feed's content, a post) carries more of the item
than the excerpt allows, counted in characters with URLs as written; the title, the canonical
link, the attribution line and the hashtags aside. A property test drives the service with
generated items, grants and policies; the adversarial cases go through the SDK's real MCP client,
to a real receiver and a real feed file.
"""

from __future__ import annotations

import json
import re
import uuid
from html.parser import HTMLParser
from typing import Any
from urllib.parse import unquote

import feedparser
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests import test_access
from tests.helpers import call
from tests.test_access import AgentClient, grant, new_agent
from wordclaw_mcp.access import AccessService
from wordclaw_mcp.adapters import canonical_link
from wordclaw_mcp.config import Settings
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import (
    Agent,
    ContentItem,
    CreateDistributionPlanInput,
    Plan,
    RegisterTargetInput,
    TransformPolicy,
    UpsertContentItemInput,
)
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.service import DistributionService
from wordclaw_mcp.text import markdown_to_text

pytestmark = pytest.mark.anyio

# The access tests' fixtures: agents with keys of their own, and an MCP client for each.
access = test_access.access
client_for = test_access.client_for

SOCIAL = ("mastodon", "bluesky", "x")
# What a payload holds besides the item's text, or the exempt parts of it, by key.
NOT_ITEM_TEXT = {"type", "contentItemId", "bodyFormat", "guid", "published", "updated", "$type"}
LINK_KEYS = {"canonicalUrl", "link"}
TITLE_KEYS = {"title", "subject"}
ATTRIBUTION_KEYS = {"attribution", "rights"}
HTML_KEYS = {"contentHtml", "html"}
POST_KEYS = {"status", "text"}  # a social post: the title first, the tail last


# --- measuring what a payload carries of the item -------------------------------------------------


class _HtmlText(HTMLParser):
    """HTML's text as a reader gets it: character references resolved, and a link or an image's
    address counted once beside its label, as plain text writes it (``label (url)``)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.links: list[tuple[str, int]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "a":
            self.links.append((values.get("href", ""), len(self.parts)))
        elif tag == "img":
            self.parts.append(values.get("alt", ""))
            if src := values.get("src"):
                self.parts.append(f" ({src})")

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self.links:
            href, start = self.links.pop()
            if href and "".join(self.parts[start:]) not in {unquote(href), unquote(href).removeprefix("mailto:")}:
                self.parts.append(f" ({href})")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def carried(value: str, exempt: list[str]) -> str:
    """What ``value`` carries of the item's text, with the exempt parts (the canonical link, the
    attribution line, the hashtags) taken out. URLs are counted as written: a percent-encoded
    address is decoded (the generated text holds no '%' of its own). Runs of whitespace count as
    one, since the formats lay text out with line ends of their own."""
    for part in sorted(filter(None, exempt), key=len, reverse=True):
        value = value.replace(part, " ")
    return re.sub(r"\s+", " ", unquote(value)).strip()


def strings(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every string in ``value`` with where it is; in metadata, its keys too (as ``path#key``)."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        found = [(f"{path}#key", key) for key in value] if ".metadata" in path else []
        return found + [pair for key, item in value.items() for pair in strings(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [pair for index, item in enumerate(value) for pair in strings(item, f"{path}[{index}]")]
    return []


def attribution_lines(payloads: list[dict[str, Any]]) -> list[str]:
    """The attribution lines the payloads carry ("By <author> · <license>"): exempt as lines, but
    each of their parts is a metadata value, within the bound like any other."""
    return [value for payload in payloads for path, value in strings(payload) if _key(path) in ATTRIBUTION_KEYS]


def assert_within(
    channel: str, payload: dict[str, Any], item: ContentItem, policy: TransformPolicy, bound: int, lines: list[str]
) -> None:
    """No string in ``channel``'s ``payload`` carries more than ``bound`` characters of ``item``'s text."""
    link = canonical_link(item, policy)
    exempt = [link or "", *(f"#{tag}" for tag in policy.hashtags), *lines]
    for line in lines:
        assert all(len(part) <= bound for part in line.removeprefix("By ").split(" · ")), (line, bound)
    for path, value in strings(payload):
        key = _key(path)
        if ".metadata" in path:
            assert len(value) <= bound, f"{path} holds {len(value)} > {bound} characters: {value!r}"
        elif key in LINK_KEYS:
            assert value == link, (path, value)
        elif key == "uri":  # a Bluesky link facet: the canonical link, or a URL of the title or the excerpt
            assert value == link or value in item.title or len(unquote(value)) <= bound, (path, value)
        elif key not in NOT_ITEM_TEXT | TITLE_KEYS | ATTRIBUTION_KEYS and ".hashtags[" not in path:
            if key in HTML_KEYS or (key == "body" and policy.output_format == "html"):
                value = html_text(value)
            if channel in SOCIAL and key in POST_KEYS:
                value = _after_title(value, item.title)
            seen = carried(value, exempt)
            assert len(seen) <= bound, f"{path} carries {len(seen)} > {bound} characters of the item: {seen!r}"


def _key(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _after_title(post: str, title: str) -> str:
    """A post without the title it opens with; a post whose title itself was cut carries nothing more."""
    if post.startswith(title):
        return post[len(title) :]
    head = post.split("\n\n", 1)[0]
    assert title.startswith(head.removesuffix("…").rstrip()), (post, title)
    return post[len(head) :]


# --- generated items, grants and policies ----------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789éüßçøœ"
# Letters, CJK, emoji (a ZWJ sequence's parts too) and Markdown's and HTML's syntax; no '%', so that
# only a percent-encoded address holds one, and no '·', the attribution line's separator.
SYMBOLS = "漢字日本語中文한국어😀🎉👩‍💻*_`#[]()<>!&;:.,?'\"-=+/\\|{}^~"
WORD = st.text(alphabet=LETTERS + SYMBOLS, min_size=1, max_size=12)
URL = st.builds(
    lambda host, path: f"https://{host}.example.com/{path}",
    st.text(alphabet="abcdefghij", min_size=1, max_size=8),
    st.text(alphabet=LETTERS + "-_/日本", max_size=60),
)
TOKEN = st.one_of(
    WORD,
    WORD,
    WORD,
    URL,
    st.builds(lambda w, u: f"[{w}]({u})", WORD, URL),
    st.builds(lambda u: f"<{u}>", URL),
    st.builds(lambda name: f"<{name}@example.com>", st.text(alphabet="abcdefgh", min_size=1, max_size=8)),
    st.builds(lambda w, u: f"![{w}]({u})", WORD, URL),
    st.builds(lambda w: f"**{w}**", WORD),
    st.builds(lambda w: f"`{w}`", WORD),
    st.sampled_from(["&amp;", "&lt;b&gt;", "&copy;", "&#128512;", "&#x1F600;", "<b>bold</b>", "example.org/bare"]),
)
LINE = st.builds(" ".join, st.lists(TOKEN, min_size=1, max_size=25))
LINE_END = st.sampled_from(["\n", "\r\n", "\r"])
# A line of a paragraph may open as a heading, a list item or a quote.
MARKED_LINE = st.builds(lambda mark, line: mark + line, st.sampled_from(["", "", "", "# ", "- ", "1. ", "> "]), LINE)
PARAGRAPH = st.builds(
    lambda lines, ends: "".join(line + end for line, end in zip(lines, ends, strict=False)) + lines[-1],
    st.lists(MARKED_LINE, min_size=1, max_size=4),
    st.lists(LINE_END, min_size=3, max_size=3),
)
LONG_PARAGRAPH = st.builds(lambda line, times: " ".join([line] * times), LINE, st.integers(20, 200))
# Every way a blank line may be written: line ends of each kind, and lines of spaces and tabs.
BLANK = st.sampled_from(
    ["\n\n", "\r\n\r\n", "\r\r", "\n \n", "\r\n\t\r\n", "\n \t \n\n", "\r \r", "\n\r", "\r\n   \r\n\r\n"]
)
SUMMARY = st.one_of(
    st.none(),
    PARAGRAPH,
    st.builds(lambda first, blank, rest: first + blank + rest, PARAGRAPH, BLANK, PARAGRAPH),
    st.builds(lambda line: (line + " ") * (5000 // (len(line) + 1)) or line[:5000], LINE),
)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), LINE, LONG_PARAGRAPH)
KEY = st.one_of(st.sampled_from(["lang", "tags", "note", "description", "x"]), WORD, LONG_PARAGRAPH)
METADATA = st.fixed_dictionaries(
    {},
    optional={
        "author": st.one_of(WORD, LINE, LONG_PARAGRAPH),
        "license": st.one_of(WORD, LONG_PARAGRAPH),
        "extra": st.recursive(
            SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEY, inner, max_size=4), max_leaves=12
        ),
        "abstract": LONG_PARAGRAPH,
    },
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, str]:
    """A body and its first paragraph, as a reader sees them: paragraphs split by any blank line."""
    paragraphs = draw(st.lists(st.one_of(PARAGRAPH, PARAGRAPH, LONG_PARAGRAPH), min_size=1, max_size=4))
    blanks = draw(st.lists(BLANK, min_size=len(paragraphs), max_size=len(paragraphs)))
    lead = draw(st.sampled_from(["", "\n", "  \r\n", "\r\n\r\n"]))
    body = lead + "".join(paragraph + blank for paragraph, blank in zip(paragraphs, blanks, strict=True))
    return body.rstrip() if draw(st.booleans()) else body, paragraphs[0].strip()


POLICIES = st.builds(
    TransformPolicy,
    output_format=st.sampled_from(["markdown", "html", "plaintext"]),
    max_length=st.one_of(st.none(), st.integers(1, 1000)),
    excerpt_only=st.just(True),
    include_canonical_url=st.booleans(),
    include_attribution=st.booleans(),
    utm=st.one_of(st.none(), st.just({"source": "wordclaw", "campaign": "launch"})),
    hashtags=st.lists(st.sampled_from(["launch", "news", "日本"]), max_size=3, unique=True),
    include_body=st.booleans(),
    include_metadata=st.booleans(),
)


# --- the property ------------------------------------------------------------------------------


@pytest.fixture
async def world(service: DistributionService) -> dict[str, Any]:
    """An owner with a target of every channel, and a reseller of the same tenant, made once per test."""
    owner, _ = await service.access.create_agent("owner", ["admin"], "acme")
    reseller, _ = await service.access.create_agent("reseller", ["admin"], "acme")
    social = {"accessToken": "token"}
    configs: dict[str, tuple[dict[str, Any], dict[str, str] | None]] = {
        "webhook": ({"url": "http://127.0.0.1:9/hook"}, None),
        "rss": ({"path": "p/rss.xml", "title": "Feed", "link": "https://example.com/"}, None),
        "atom": ({"path": "p/atom.xml", "title": "Feed", "link": "https://example.com/"}, None),
        "email": ({"host": "127.0.0.1", "port": 2525, "security": "none", "from": "a@e.com", "to": ["b@e.com"]}, None),
        "mastodon": ({"baseUrl": "http://127.0.0.1:9/"}, social),
        "bluesky": ({"baseUrl": "http://127.0.0.1:9/", "identifier": "me.example.com"}, {"appPassword": "pw"}),
        "x": ({"baseUrl": "http://127.0.0.1:9/"}, social),
    }
    targets = {}
    for channel, (config, secrets) in configs.items():
        request = RegisterTargetInput(name=channel, channel_type=channel, config=config, secrets=secrets)
        targets[channel] = (await service.register_target(request, agent=owner)).id
    return {"owner": owner, "reseller": reseller, "targets": targets}


async def dry_run(
    service: DistributionService, agent: Agent, item: ContentItem, targets: list[uuid.UUID], policy: TransformPolicy
) -> Plan:
    request = CreateDistributionPlanInput(
        content_item_id=item.id, target_ids=targets, transform_policy=policy, dry_run=True
    )
    return await service.create_distribution_plan(request, agent=agent)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    title=LINE,
    body=bodies(),
    summary=SUMMARY,
    metadata=METADATA,
    canonical=st.sampled_from([None, "https://example.com/posts/licensed?id=7"]),
    max_excerpt_chars=st.one_of(st.none(), st.integers(1, 400)),
    policy=POLICIES,
)
async def test_an_excerpt_grant_bounds_every_field_of_every_channel(
    service: DistributionService,
    world: dict[str, Any],
    title: str,
    body: tuple[str, str],
    summary: str | None,
    metadata: dict[str, Any],
    canonical: str | None,
    max_excerpt_chars: int | None,
    policy: TransformPolicy,
) -> None:
    text, first_paragraph = body
    item = await service.upsert_content_item(
        UpsertContentItemInput(
            title=title[:500], body=text, summary=summary, canonical_url=canonical, metadata=metadata
        ),
        agent=world["owner"],
    )
    await service.access.grant(
        world["reseller"].id,
        content_item_id=item.id,
        allow_redistribution=True,
        excerpt_only=True,
        max_excerpt_chars=max_excerpt_chars,
    )
    # The excerpt is the summary, else the body's first paragraph, whatever its blank line is made of.
    bound = max_excerpt_chars if max_excerpt_chars is not None else len(summary or first_paragraph)
    targets = world["targets"]
    plans = [await dry_run(service, world["reseller"], item, [targets[c] for c in targets if c not in SOCIAL], policy)]
    for channel in SOCIAL:  # one plan each: a post that cannot fit fails its whole plan
        try:
            plans.append(await dry_run(service, world["reseller"], item, [targets[channel]], policy))
        except DistributionError as exc:  # too short for its link, hashtags or attribution: not sent at all
            assert exc.code == "POLICY_DOES_NOT_FIT", exc
            event(f"the {channel} post's policy did not fit")
    previews = [preview for plan in plans for preview in plan.previews]
    lines = attribution_lines([preview.payload for preview in previews])
    for preview in previews:
        assert preview.decision is not None and preview.decision.code == "ENTITLED"
        assert_within(preview.channel_type, preview.payload, item, policy, bound, lines)
        if preview.limit is not None:
            assert preview.length is not None and preview.length <= preview.limit


# --- adversarial cases, through the real MCP client ---------------------------------------------------

# The repro: a summary of 4,855 characters, and a grant of excerpts of at most 40.
LONG_SUMMARY = " ".join(
    f"Sentence {n} of the summary, with https://example.com/s/{n} and 日本語." for n in range(1, 200)
)[:4855]
TAIL = "the summary, with https://example.com/s/199"  # far past the 40th character


async def reseller_and_owner(access: AccessService) -> tuple[Agent, str, str]:
    _owner, owner_key = await new_agent(access, "owner")
    reseller, reseller_key = await new_agent(access, "reseller")
    return reseller, reseller_key, owner_key


async def register_webhook_and_feed(client: Any, url: str) -> tuple[dict, dict]:
    webhook = await call(client, "register_target", name="hook", channelType="webhook", config={"url": url})
    rss = await call(
        client,
        "register_target",
        name="feed",
        channelType="rss",
        config={"path": "feed.xml", "title": "Feed", "link": "https://example.com/"},
    )
    return webhook, rss


async def test_a_40_character_excerpt_grant_bounds_a_4855_character_summary_in_a_dry_run_and_a_delivery(
    access: AccessService, client_for: AgentClient, receiver: WebhookReceiver, settings: Settings
):
    assert len(LONG_SUMMARY) == 4855
    reseller, reseller_key, owner_key = await reseller_and_owner(access)
    async with client_for(owner_key) as owner:
        item = await call(
            owner,
            "upsert_content_item",
            title="A title that is longer than the forty characters the grant allows",
            body="The body's opening paragraph.\n\nAnd the rest of it.",
            summary=LONG_SUMMARY,
            canonicalUrl="https://example.com/posts/licensed",
            metadata={"author": "Ada " * 30, "license": "CC BY-NC 4.0", "notes": {"long": LONG_SUMMARY}},
        )
        webhook, rss = await register_webhook_and_feed(owner, receiver.url)
    # As `wordclaw entitlements grant --excerpt-only --max-excerpt-chars 40 --allow-redistribution` does.
    await grant(access, reseller, item, excerpt_only=True, max_excerpt_chars=40)
    arguments = {
        "contentItemId": item["id"],
        "targetIds": [webhook["id"], rss["id"]],
        "transformPolicy": {"excerptOnly": True, "includeAttribution": True},
    }
    async with client_for(reseller_key, run_worker=True) as client:
        preview = await call(client, "create_distribution_plan", dryRun=True, **arguments)
        plan = await call(client, "create_distribution_plan", awaitDelivery=True, **arguments)
        feed_xml = (await client.read_resource(f"feed://{rss['id']}")).contents[0].text
    [hook_preview, feed_preview] = [p["payload"] for p in preview["previews"]]
    # The dry run says the grant cut the excerpt, and where.
    assert all(p["truncated"] and p["limit"] == 40 and 0 < p["cutAt"] < 40 for p in preview["previews"]), preview
    assert plan["status"] == "succeeded", plan
    [request] = receiver.requests
    delivered = json.loads(request.body)["data"]
    assert delivered == hook_preview["data"], "the delivery differs from its dry run"
    for data in (hook_preview["data"], delivered):
        assert len(data["summary"]) <= 40 and len(data["body"]) <= 40, data
        assert data["summary"].endswith("…") and LONG_SUMMARY.startswith(data["summary"][:-1].rstrip())
        assert all(len(value) <= 40 for value in (data["metadata"]["author"], data["metadata"]["notes"]["long"]))
        assert data["title"] == item["title"], "the title is not the grant's to cut"
    assert len(feed_preview["summary"]) <= 40 and len(html_text(feed_preview["contentHtml"]).strip()) <= 40
    assert len(feed_preview["author"]) <= 40
    [feed_file] = settings.feeds_path.rglob("feed.xml")  # wherever the feed's tenant keeps it
    entries = feedparser.parse(feed_file.read_bytes()).entries
    assert feed_xml == feed_file.read_text()
    [entry] = entries
    assert len(entry.summary) <= 40 and entry.title == item["title"]
    everything = json.dumps([preview, delivered]) + feed_xml
    assert TAIL not in everything and "Sentence 2 " not in everything


@pytest.mark.parametrize(
    "blank",
    ["\r\n\r\n", "\r\r", "\n \t\n", "\r\n  \t \r\n", "\n\r", "\r\n\r\n \r\n"],
    ids=["crlf", "cr", "spaces-and-tabs", "crlf-with-spaces", "lf-then-cr", "two-blank-lines"],
)
async def test_a_first_paragraph_ends_at_any_blank_line(
    blank: str, access: AccessService, client_for: AgentClient, receiver: WebhookReceiver
):
    opening = "The opening paragraph,\r\nover two lines."
    reseller, reseller_key, owner_key = await reseller_and_owner(access)
    async with client_for(owner_key) as owner:
        item = await call(
            owner, "upsert_content_item", title="Paragraphs", body=f"{opening}{blank}The rest, which is not an excerpt."
        )
        webhook, rss = await register_webhook_and_feed(owner, receiver.url)
        targets = [webhook["id"], rss["id"]]
        # The item's own creator asking for an excerpt gets the same first paragraph.
        own = await call(
            owner,
            "create_distribution_plan",
            contentItemId=item["id"],
            targetIds=targets,
            transformPolicy={"excerptOnly": True},
            dryRun=True,
        )
    await grant(access, reseller, item, excerpt_only=True)  # no maxExcerptChars: the excerpt's own length
    async with client_for(reseller_key) as client:
        granted = await call(
            client,
            "create_distribution_plan",
            contentItemId=item["id"],
            targetIds=targets,
            transformPolicy={"excerptOnly": True, "outputFormat": "plaintext"},
            dryRun=True,
        )
    for preview, body in ((own, opening), (granted, opening.replace("\r\n", "\n"))):  # granted: as plain text
        [hook, feed] = [p["payload"] for p in preview["previews"]]
        assert hook["data"]["body"] == body
        assert html_text(feed["contentHtml"]).strip() == "The opening paragraph,\nover two lines."
        assert "The rest" not in json.dumps(preview)


async def test_metadata_nested_as_deep_as_the_database_takes_is_bounded_too(
    service: DistributionService, world: dict[str, Any]
):
    # Tools take metadata 32 levels deep at most; an item stored before that rule may be deeper.
    deep: Any = "x" * 100
    for _ in range(900):
        deep = {"k": deep}
    item = await service.upsert_content_item(
        UpsertContentItemInput(title="Deep", body="Body.", summary="Short."), agent=world["owner"]
    )
    await service.pool.execute("UPDATE content_items SET metadata = $2 WHERE id = $1", item.id, {"deep": deep})
    await service.access.grant(
        world["reseller"].id,
        content_item_id=item.id,
        allow_redistribution=True,
        excerpt_only=True,
        max_excerpt_chars=40,
    )
    policy = TransformPolicy(excerpt_only=True)
    plan = await dry_run(service, world["reseller"], item, [world["targets"]["webhook"]], policy)
    metadata = plan.previews[0].payload["data"]["metadata"]["deep"]
    for _ in range(900):
        metadata = metadata["k"]
    assert metadata == "x" * 39 + "…"


def test_plain_text_does_not_repeat_an_address_that_is_its_own_label():
    # markdown-it percent-encodes an autolink's href and writes its label as the address was
    # written; "label (href)" would then carry the address twice, and the excerpt twice over.
    plain = markdown_to_text("<https://example.com/日本> <ada@example.com> [docs](https://example.com/ß)")
    assert plain == "https://example.com/日本 ada@example.com docs (https://example.com/%C3%9F)"
