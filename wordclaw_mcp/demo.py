"""``wordclaw demo``: an agent's plan delivered to a webhook, end to end, on this machine.

Starts a local webhook receiver, spawns ``wordclaw-mcp`` over stdio with its in-process worker
(on the embedded PostgreSQL unless WORDCLAW_DATABASE_URL is set), and drives it as an agent:
create a content item, register the receiver as a signed target, publish with awaitDelivery.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import uuid
from typing import Any

from mcp import Client, StdioServerParameters
from standardwebhooks import Webhook

from .receiver import WebhookReceiver


def server_parameters(**env: str) -> StdioServerParameters:
    """Spawn this installation's MCP server, passing on the WORDCLAW_* settings.

    The SDK gives a spawned server only a minimal environment, so settings are passed explicitly.
    """
    inherited = {key: value for key, value in os.environ.items() if key.startswith("WORDCLAW_")}
    return StdioServerParameters(command=sys.executable, args=["-m", "wordclaw_mcp", "mcp"], env={**inherited, **env})


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise SystemExit(f"{tool} failed: {result.content[0].text}")
    return result.structured_content or {}


async def run_demo() -> int:
    signing_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    say = lambda text: print(text, flush=True)  # noqa: E731
    with WebhookReceiver() as receiver:
        say(f"webhook receiver listening on {receiver.url}")
        # The receiver is on loopback, which targets may only reach when the deployment allows it.
        params = server_parameters(WORDCLAW_ALLOW_PRIVATE_TARGETS="1", WORDCLAW_RUN_WORKER="1")
        say("starting wordclaw-mcp over stdio (first run initialises the embedded PostgreSQL)...")
        async with Client(params) as client:
            item = await call(
                client,
                "upsert_content_item",
                title="Hello from WordClaw",
                body="# Hello\n\nPublished **once**, delivered everywhere.",
                summary="A first distribution.",
                canonicalUrl="https://example.com/hello",
            )
            say(f"content item {item['id']} (version {item['version']})")
            target = await call(
                client,
                "register_target",
                name=f"demo-webhook-{uuid.uuid4().hex[:8]}",
                channelType="webhook",
                config={"url": receiver.url},
                secrets={"signingSecret": signing_secret},
            )
            say(f"target {target['name']} {target['id']} (secrets stored: {target['hasSecrets']})")
            plan = await call(
                client,
                "create_distribution_plan",
                contentItemId=item["id"],
                targetIds=[target["id"]],
                transformPolicy={"bodyFormat": "html"},
                awaitDelivery=True,
            )
        say(f"plan {plan['id']}: {plan['status']}")
        for receipt in plan.get("receipts") or []:
            say(
                "receipt: "
                + json.dumps(
                    {
                        k: receipt[k]
                        for k in ("jobId", "attempt", "succeeded", "statusCode", "externalUrl", "errorMessage")
                    }
                )
            )
        if not receiver.requests:
            say("the receiver got nothing")
            return 1
        request = receiver.requests[0]
        delivered = Webhook(signing_secret).verify(request.body, request.headers)
        say(
            f"receiver got {request.method} {request.path}, signature verified, "
            f"webhook-id {request.headers['webhook-id']}:"
        )
        say(json.dumps(delivered, indent=2))
        return 0 if plan["status"] == "succeeded" else 1
