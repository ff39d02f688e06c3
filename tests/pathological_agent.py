"""The heavy agent of tests/test_pathological_inputs.py, in a process of its own (so that
parsing its multi-megabyte answers does not hold the test's event loop): it registers a target
of every channel, then calls every tool on the largest pathological inputs, and prints one JSON
line per timed call: label, seconds, and "ok" or the error's code.

    python -m tests.pathological_agent URL KEY
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from wordclaw_mcp.models import MAX_METADATA_DEPTH

MILLION = 1_000_000  # the longest body upsert_content_item takes
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"

# Bodies of the largest size, each the worst known shape for a parser: "a." for twitter-text's
# domains, "[" and lines for markdown-it, "<" for markdown-it and html.parser, emoji sequences
# for the emoji and grapheme counts, one long word of URLs for the cut's fallback and the facets.
BODIES = {
    "dots": "a." * (MILLION // 2),
    "brackets": "[" * MILLION,
    "lines": "a\n" * (MILLION // 2),
    "angles": "<" * MILLION,
    "emoji": FAMILY * (MILLION // len(FAMILY)),
    "links": ("https://example.com/" + "a." * 40) * (MILLION // 100),
}
HTML_BODIES = {
    "nested": "<div>" * 3000 + "x" + "</div>" * 3000,
    "tags": "<b>x</b>" * (MILLION // 8),
    "angles": "<" * MILLION,
    "dots": "a." * (MILLION // 2),
    "brackets": "[" * MILLION,
}
SOCIAL = {"baseUrl": "http://127.0.0.1:9"}
TARGETS: list[tuple[str, dict[str, Any], dict[str, str] | None]] = [
    ("webhook", {"url": "http://127.0.0.1:9/hook"}, None),
    ("rss", {"path": "budget/feed.xml", "title": "Budget", "link": "https://example.com/"}, None),
    ("atom", {"path": "budget/feed.atom", "title": "Budget", "link": "https://example.com/"}, None),
    (
        "email",
        {"host": "127.0.0.1", "port": 2525, "security": "none", "from": "a@example.com", "to": ["b@example.com"]},
        None,
    ),
    ("mastodon", SOCIAL, {"accessToken": "token"}),
    ("bluesky", {**SOCIAL, "identifier": "budget.example.com"}, {"appPassword": "secret"}),
    ("x", SOCIAL, {"accessToken": "token"}),
]


async def main(url: str, key: str) -> None:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http)) as heavy,
    ):
        target_ids = []
        for channel, config, secrets in TARGETS:
            extra = {"secrets": secrets} if secrets else {}
            _, _, target = await answer(
                heavy, "register_target", name=channel, channelType=channel, config=config, **extra
            )
            target_ids.append(target["id"])

        async def timed(label: str, tool: str, **arguments: Any) -> dict[str, Any]:
            seconds, outcome, result = await answer(heavy, tool, **arguments)
            print(json.dumps({"label": label, "seconds": seconds, "outcome": outcome}), flush=True)
            return result

        items = {}
        for name, body in BODIES.items():
            item = await timed(f"upsert {name}", "upsert_content_item", title="Budget", body=body)
            items[name] = item["id"]
        for name, html in HTML_BODIES.items():
            await timed(f"upsert html {name}", "upsert_content_item", title="t", body=html, bodyFormat="html")
        await timed(
            "upsert the longest title, summary and metadata",
            "upsert_content_item",
            title="a." * 250,
            body="[" * MILLION,
            summary="a." * 2500,
            metadata={"note": "a." * (MILLION // 2), "deep": _nested(MAX_METADATA_DEPTH - 2)},
        )
        await timed(
            "upsert metadata nested 200 deep", "upsert_content_item", title="t", body="b", metadata=_nested(199)
        )
        for name, item_id in items.items():
            await timed(
                f"dry run {name}, maxLength 50",
                "create_distribution_plan",
                contentItemId=item_id,
                targetIds=target_ids,
                dryRun=True,
                transformPolicy={"maxLength": 50, "hashtags": ["budget"]},
            )
        for name in ("dots", "brackets"):
            await timed(
                f"dry run {name}, whole body",
                "create_distribution_plan",
                contentItemId=items[name],
                targetIds=target_ids,
                dryRun=True,
            )
        await timed(
            "register a webhook at a URL of a million characters",
            "register_target",
            name="a." * 100,
            channelType="webhook",
            config={"url": "https://" + "a." * (MILLION // 2) + "com/"},
        )
        await timed(
            "register a mastodon target with pathological config strings",
            "register_target",
            name="[" * 200,
            channelType="mastodon",
            config={"baseUrl": "http://" + "[" * MILLION, "visibility": "<" * 1000},
            secrets={"accessToken": "a." * 1000},
        )


async def answer(client: Client, tool: str, **arguments: Any) -> tuple[float, str, dict[str, Any]]:
    """How long ``tool`` took, "ok" or its error's code (which it must have), and its result."""
    started = time.monotonic()
    result = await client.call_tool(tool, arguments)
    seconds = time.monotonic() - started
    if not result.is_error:
        return seconds, "ok", result.structured_content or {}
    error = json.loads(result.content[0].text)["error"]
    assert error["code"].isupper() and error["remediation"], error
    return seconds, error["code"], error


def _nested(depth: int) -> dict[str, Any]:
    """Objects ``depth + 1`` levels deep."""
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"d": value}
    return value


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
