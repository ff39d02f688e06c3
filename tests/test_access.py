"""Who may publish what, through the SDK's real MCP client: agents and their keys, scopes, tenants,
entitlements (pre-flight, at delivery, the budget, the decision log), the duplicate rule and
idempotency keys."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from mcp import Client

from queue_worker.worker import Worker
from tests.helpers import answer_of, call, call_error, serving_http
from wordclaw_mcp.access import AccessService
from wordclaw_mcp.config import Settings
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import Agent
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.server import build_server
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

ALL_SCOPES = ["distribution:read", "distribution:write", "targets:admin", "content:write"]

AgentClient = Callable[..., AbstractAsyncContextManager[Client]]


@pytest.fixture
def access(service: DistributionService) -> AccessService:
    return service.access


@pytest.fixture
def client_for(settings: Settings) -> AgentClient:
    """An MCP client on a server authenticated with ``key`` (WORDCLAW_AGENT_KEY), no local agent."""

    @asynccontextmanager
    async def open_client(key: str, **changes: Any) -> AsyncIterator[Client]:
        async with Client(build_server(replace(settings, agent_key=key, local_agent=False, **changes))) as client:
            yield client

    return open_client


async def new_agent(access: AccessService, name: str, tenant: str = "acme", scopes: list[str] | None = None):
    return await access.create_agent(name, scopes or ALL_SCOPES, tenant)


async def item_and_webhook(client: Client, url: str, name: str = "hook") -> tuple[dict, dict]:
    item = await call(client, "upsert_content_item", title="Licensed", body="The **full** body, which goes on and on.")
    target = await call(client, "register_target", name=name, channelType="webhook", config={"url": url})
    return item, target


async def job_count(db: asyncpg.Connection) -> int:
    return await db.fetchval("SELECT count(*) FROM distribution_jobs")


# --- agents, keys and scopes ----------------------------------------------------------------------


async def test_a_key_is_random_shown_once_and_stored_only_as_a_hash(access: AccessService, db: asyncpg.Connection):
    agent, key = await new_agent(access, "writer")
    other_agent, other_key = await new_agent(access, "writer-2")
    assert key.startswith("wck_") and len(key) >= 44 and key != other_key
    stored = await db.fetchrow("SELECT * FROM agents WHERE id = $1", agent.id)
    assert key not in json.dumps({k: str(v) for k, v in dict(stored).items()})
    assert stored["key_prefix"] == key[4:12] and len(bytes(stored["key_hash"])) == 32
    assert (await access.authenticate(key)).id == agent.id
    assert (await access.authenticate(other_key)).id == other_agent.id
    for wrong in (key[:-1] + ("A" if key[-1] != "A" else "B"), "wck_" + "x" * 43, "not-a-key", ""):
        with pytest.raises(DistributionError) as refused:
            await access.authenticate(wrong)
        assert refused.value.code == "AGENT_KEY_INVALID"


async def test_the_agent_a_session_acts_as_comes_from_its_key(access: AccessService, client_for: AgentClient):
    agent, key = await new_agent(access, "reporter", tenant="acme", scopes=["distribution:read"])
    async with client_for(key) as client:
        me = await call(client, "get_my_entitlements")
    assert me["agent"]["id"] == str(agent.id) and me["agent"]["tenantId"] == "acme"
    assert me["agent"]["scopes"] == ["distribution:read"] and me["entitlements"] == []
    assert "keyHash" not in me["agent"] and key not in json.dumps(me)


async def test_a_revoked_or_wrong_key_cannot_start_a_session(access: AccessService, client_for: AgentClient):
    agent, key = await new_agent(access, "leaver")
    await access.revoke_agent(agent.id)
    for bad in (key, "wck_" + "A" * 43):
        with pytest.raises(DistributionError) as failed:
            async with client_for(bad) as client:
                await call(client, "get_my_entitlements")
        assert failed.value.code == "AGENT_KEY_INVALID"


async def test_without_a_key_or_a_local_agent_every_call_is_refused(settings: Settings):
    async with Client(build_server(replace(settings, local_agent=False))) as client:
        error = await call_error(client, "list_targets")
    assert error["code"] == "AGENT_KEY_REQUIRED" and "WORDCLAW_AGENT_KEY" in error["remediation"]


@pytest.mark.parametrize(
    ("tool", "arguments", "scope"),
    [
        ("upsert_content_item", {"title": "t", "body": "b"}, "content:write"),
        (
            "register_target",
            {"name": "n", "channelType": "webhook", "config": {"url": "https://e.example/"}},
            "targets:admin",
        ),
        ("rotate_target_secret", {"targetId": str(uuid.uuid4())}, "targets:admin"),
        (
            "create_distribution_plan",
            {"contentItemId": str(uuid.uuid4()), "targetIds": [str(uuid.uuid4())]},
            "distribution:write",
        ),
        ("cancel_plan", {"planId": str(uuid.uuid4())}, "distribution:write"),
        ("retry_plan", {"planId": str(uuid.uuid4())}, "distribution:write"),
    ],
)
async def test_each_tool_checks_its_scope(
    access: AccessService, client_for: AgentClient, tool: str, arguments: dict, scope: str
):
    _agent, key = await new_agent(access, "read-only", scopes=["distribution:read"])
    async with client_for(key) as client:
        error = await call_error(client, tool, **arguments)
        assert (await call(client, "list_targets"))["targets"] == []  # what it may do, it can
    assert error["code"] == "FORBIDDEN"
    assert error["details"]["requiredScope"] == scope and scope in error["message"] and scope in error["remediation"]


async def test_admin_implies_every_scope(access: AccessService, client_for: AgentClient, receiver: WebhookReceiver):
    _agent, key = await new_agent(access, "boss", scopes=["admin"])
    async with client_for(key) as client:
        item, target = await item_and_webhook(client, receiver.url)
        plan = await call(client, "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"]])
    assert plan["status"] == "queued"


# --- HTTP -----------------------------------------------------------------------------------------


async def test_http_answers_401_without_a_valid_bearer_key_and_serves_the_keys_agent(
    access: AccessService, settings: Settings
):
    import httpx
    from mcp.client.streamable_http import streamable_http_client

    agent, key = await new_agent(access, "remote", tenant="acme", scopes=["distribution:read"])
    revoked, revoked_key = await new_agent(access, "gone")
    await access.revoke_agent(revoked.id)
    async with serving_http(settings) as url:
        async with httpx.AsyncClient() as http:
            hello = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
            for headers in (
                {},
                {"Authorization": "Bearer wck_wrong"},
                {"Authorization": f"Bearer {revoked_key}"},
                {"Authorization": f"Basic {key}"},
            ):
                answer = await http.post(url, json=hello, headers=headers)
                assert answer.status_code == 401, (headers, answer.text)
                assert answer.json()["error"]["code"] == "AGENT_KEY_INVALID"
                assert answer.headers["www-authenticate"].startswith("Bearer")
        import httpx2

        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as authed,
            Client(streamable_http_client(url, http_client=authed)) as client,
        ):
            me = await call(client, "get_my_entitlements")
            assert me["agent"]["id"] == str(agent.id)
            forbidden = await call_error(client, "upsert_content_item", title="t", body="b")
            assert forbidden["code"] == "FORBIDDEN"


def mcp_answer(response: Any) -> dict[str, Any]:
    """The JSON-RPC message of a streamable HTTP answer, sent as JSON or as one SSE event."""
    if response.headers["content-type"].startswith("application/json"):
        return response.json()
    [data] = [line.removeprefix("data:").strip() for line in response.text.splitlines() if line.startswith("data:")]
    return json.loads(data)


async def test_an_http_session_answers_only_the_agent_that_opened_it(access: AccessService, settings: Settings):
    """Another agent's valid key with a session's id is answered as if there were no such session,
    for a tool call and for a DELETE; the session goes on working for its owner."""
    import httpx
    from mcp_types.version import LATEST_HANDSHAKE_VERSION

    owner, owner_key = await new_agent(access, "owner", tenant="acme")
    _other, other_key = await new_agent(access, "neighbour", tenant="acme", scopes=["admin"])

    def headers(key: str, session: str | None = None) -> dict[str, str]:
        sent = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
        if session is not None:
            sent |= {"mcp-session-id": session, "mcp-protocol-version": LATEST_HANDSHAKE_VERSION}
        return sent

    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": LATEST_HANDSHAKE_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"},
        },
    }
    whoami = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "get_my_entitlements"}}
    async with serving_http(settings) as url, httpx.AsyncClient(timeout=10) as http:
        opened = await http.post(url, json=initialize, headers=headers(owner_key))
        assert opened.status_code == 200, opened.text
        session = opened.headers["mcp-session-id"]
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await http.post(url, json=initialized, headers=headers(owner_key, session))).status_code == 202

        unknown = await http.post(url, json=whoami, headers=headers(other_key, "f" * 32))
        assert unknown.status_code == 404
        for attempt in (
            http.post(url, json=whoami, headers=headers(other_key, session)),
            http.delete(url, headers=headers(other_key, session)),
            http.get(url, headers=headers(other_key, session)),
        ):
            answer = await attempt
            assert (answer.status_code, answer.json()) == (404, unknown.json()), answer.text

        own = await http.post(url, json=whoami, headers=headers(owner_key, session))
        assert own.status_code == 200, own.text
        result = mcp_answer(own)["result"]
        assert result["structuredContent"]["agent"]["id"] == str(owner.id), result
        assert (await http.delete(url, headers=headers(owner_key, session))).status_code == 200
        assert (await http.post(url, json=whoami, headers=headers(owner_key, session))).status_code == 404


# --- tenants --------------------------------------------------------------------------------------


async def test_an_agent_sees_nothing_of_another_tenant(
    access: AccessService, client_for: AgentClient, receiver: WebhookReceiver
):
    _a, acme_key = await new_agent(access, "acme-bot", tenant="acme")
    _b, globex_key = await new_agent(access, "globex-bot", tenant="globex")
    async with client_for(acme_key) as acme, client_for(globex_key) as globex:
        item, target = await item_and_webhook(acme, receiver.url, name="shared-name")
        plan = await call(acme, "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"]])
        own_item, own_target = await item_and_webhook(globex, receiver.url, name="shared-name")  # names are per tenant

        assert [t["id"] for t in (await call(globex, "list_targets"))["targets"]] == [own_target["id"]]
        for tool in ("get_plan", "cancel_plan", "get_receipts"):
            theirs = await call_error(globex, tool, planId=plan["id"])
            missing = await call_error(globex, tool, planId=str(uuid.uuid4()))
            assert theirs["code"] == missing["code"] == "PLAN_NOT_FOUND"
            assert theirs["remediation"] == missing["remediation"]
        cross_item = await call_error(
            globex, "create_distribution_plan", contentItemId=item["id"], targetIds=[own_target["id"]]
        )
        cross_target = await call_error(
            globex, "create_distribution_plan", contentItemId=own_item["id"], targetIds=[target["id"]]
        )
        update = await call_error(globex, "upsert_content_item", id=item["id"], title="Mine now", body="x")
        rotate = await call_error(globex, "rotate_target_secret", targetId=target["id"])
        assert (cross_item["code"], cross_target["code"]) == ("CONTENT_ITEM_NOT_FOUND", "TARGET_NOT_FOUND")
        assert (update["code"], rotate["code"]) == ("CONTENT_ITEM_NOT_FOUND", "TARGET_NOT_FOUND")
        # Acme's plan is untouched by globex's attempts.
        assert (await call(acme, "get_plan", planId=plan["id"]))["status"] == "queued"


# --- entitlements -----------------------------------------------------------------------------------


@pytest.fixture
async def licensed(access: AccessService, client_for: AgentClient, receiver: WebhookReceiver):
    """An item and two targets (webhook, rss) owned by one agent, and a second agent of the same
    tenant that needs a grant to distribute the item: (owner, reseller, item, webhook, rss)."""
    owner, owner_key = await new_agent(access, "owner")
    reseller, reseller_key = await new_agent(access, "reseller")
    async with client_for(owner_key) as client:
        item, webhook = await item_and_webhook(client, receiver.url)
        rss = await call(
            client,
            "register_target",
            name="feed",
            channelType="rss",
            config={"path": "feed.xml", "title": "Feed", "link": "https://example.com/"},
        )
    return {
        "owner": owner,
        "reseller": reseller,
        "reseller_key": reseller_key,
        "item": item,
        "webhook": webhook,
        "rss": rss,
    }


async def grant(access: AccessService, agent: Agent, item: dict | None, **terms: Any):
    terms.setdefault("allow_redistribution", True)
    return await access.grant(agent.id, content_item_id=uuid.UUID(item["id"]) if item else None, **terms)


async def plan_licensed(client: Client, licensed: dict, *targets: str, **arguments: Any) -> dict[str, Any]:
    """create_distribution_plan for the licensed item to the named targets ("webhook", "rss")."""
    ids = [licensed[name]["id"] for name in targets]
    return await call(
        client, "create_distribution_plan", contentItemId=licensed["item"]["id"], targetIds=ids, **arguments
    )


async def refused_plan(client: Client, licensed: dict, *targets: str, **arguments: Any) -> dict[str, Any]:
    """The error create_distribution_plan answers for the licensed item to the named targets."""
    ids = [licensed[name]["id"] for name in targets]
    return await call_error(
        client, "create_distribution_plan", contentItemId=licensed["item"]["id"], targetIds=ids, **arguments
    )


DENIALS = {
    "ENTITLEMENT_NOT_FOUND": None,
    "REDISTRIBUTION_NOT_ALLOWED": {"allow_redistribution": False},
    "CHANNEL_NOT_ALLOWED": {"allowed_channels": ["rss", "email"]},
    "EXCERPT_ONLY": {"excerpt_only": True},
    "ENTITLEMENT_EXPIRED": {"expires_at": datetime.now(UTC) - timedelta(minutes=1)},
    "ENTITLEMENT_REVOKED": {},
    "ENTITLEMENT_EXHAUSTED": {"max_distributions": 1},
}


@pytest.mark.parametrize("code", list(DENIALS))
async def test_each_denial_queues_nothing_and_is_logged(
    code: str, licensed: dict, access: AccessService, client_for: AgentClient, db: asyncpg.Connection
):
    reseller, item, webhook = licensed["reseller"], licensed["item"], licensed["webhook"]
    if DENIALS[code] is not None:
        granted = await grant(access, reseller, item, **DENIALS[code])
        if code == "ENTITLEMENT_REVOKED":
            await access.revoke_entitlement(granted.id)
        if code == "ENTITLEMENT_EXHAUSTED":
            await db.execute("UPDATE entitlements SET distributions_used = 1 WHERE id = $1", granted.id)
    before = await job_count(db)
    async with client_for(licensed["reseller_key"]) as client:
        error = await refused_plan(client, licensed, "rss", "webhook")
    assert error["code"] == code, error
    assert error["message"] and error["remediation"]
    assert await job_count(db) == before, "a denied plan queued jobs"
    if code == "CHANNEL_NOT_ALLOWED":
        assert error["details"]["channel"] == "webhook" and error["details"]["allowedChannels"] == ["email", "rss"]
        assert "webhook" in error["message"] and "rss" in error["message"]
    if code == "EXCERPT_ONLY":
        assert "transformPolicy.excerptOnly" in error["remediation"]
    assert {"targetId": webhook["id"], "channelType": "webhook", "code": code} in error["details"]["deniedTargets"]
    logged = await db.fetch(
        "SELECT outcome, code, channel_type FROM entitlement_decisions WHERE agent_id = $1 AND stage = 'plan'",
        reseller.id,
    )
    assert ("deny", code, "webhook") in [tuple(row) for row in logged]


async def test_only_an_items_creator_or_an_admin_may_change_it(
    licensed: dict, access: AccessService, client_for: AgentClient
):
    _boss, boss_key = await new_agent(access, "boss", scopes=["admin"])
    async with client_for(licensed["reseller_key"]) as reseller, client_for(boss_key) as boss:
        refused = await call_error(reseller, "upsert_content_item", id=licensed["item"]["id"], title="Mine", body="x")
        fixed = await call(boss, "upsert_content_item", id=licensed["item"]["id"], title="Fixed", body="Typo fixed.")
    assert refused["code"] == "FORBIDDEN" and "created by another agent" in refused["message"]
    assert fixed["version"] == 2 and fixed["createdByAgentId"] == str(licensed["owner"].id)


async def test_the_creator_needs_no_grant_and_a_grant_lets_another_agent_distribute(
    licensed: dict, access: AccessService, client_for: AgentClient, db: asyncpg.Connection
):
    granted = await grant(access, licensed["reseller"], None, allowed_channels=["webhook"])  # every item of the tenant
    async with client_for(licensed["reseller_key"]) as client:
        plan = await plan_licensed(client, licensed, "webhook")
        mine = await call(client, "get_my_entitlements")
    assert plan["status"] == "queued"
    assert [e["id"] for e in mine["entitlements"]] == [str(granted.id)]
    assert mine["entitlements"][0]["distributionsUsed"] == 1 and mine["entitlements"][0]["contentItemId"] is None
    rows = await db.fetch(
        "SELECT outcome, code, plan_id, entitlement_id FROM entitlement_decisions WHERE stage = 'plan'"
    )
    assert [tuple(row) for row in rows] == [("allow", "ENTITLED", uuid.UUID(plan["id"]), granted.id)]
    assert await db.fetchval("SELECT entitlement_id FROM distribution_jobs") == granted.id


async def test_an_excerpt_grant_allows_an_excerpt_no_longer_than_it_permits(
    licensed: dict, access: AccessService, client_for: AgentClient
):
    await grant(access, licensed["reseller"], licensed["item"], excerpt_only=True, max_excerpt_chars=12)
    async with client_for(licensed["reseller_key"]) as client:
        preview = await plan_licensed(
            client,
            licensed,
            "webhook",
            transformPolicy={"excerptOnly": True, "includeCanonicalUrl": False},
            dryRun=True,
        )
    [only] = preview["previews"]
    assert only["decision"]["outcome"] == "allow" and only["decision"]["code"] == "ENTITLED"
    # The body's opening, cut to the grant's 12 characters, never the whole body.
    assert only["limit"] == 12 and only["truncated"] and only["length"] <= 12, only
    assert "goes on and on" not in json.dumps(only["payload"])


async def test_a_dry_run_reports_each_targets_decision_and_queues_nothing(
    licensed: dict, access: AccessService, client_for: AgentClient, db: asyncpg.Connection
):
    await grant(access, licensed["reseller"], licensed["item"], allowed_channels=["rss"])
    async with client_for(licensed["reseller_key"]) as client:
        preview = await plan_licensed(client, licensed, "rss", "webhook", dryRun=True)
    decisions = [(p["channelType"], p["decision"]["outcome"], p["decision"]["code"]) for p in preview["previews"]]
    assert decisions == [("rss", "allow", "ENTITLED"), ("webhook", "deny", "CHANNEL_NOT_ALLOWED")]
    assert preview["previews"][1]["decision"]["remediation"]
    # The denied target's payload is withheld: a dry run is no way to read what one may not send.
    assert preview["previews"][1]["payload"] == {} and "goes on and on" not in json.dumps(preview["previews"][1])
    assert "goes on and on" in json.dumps(preview["previews"][0]["payload"])
    assert await job_count(db) == 0
    logged = await db.fetch("SELECT stage, outcome, code FROM entitlement_decisions ORDER BY id")
    assert [tuple(row) for row in logged] == [
        ("dry_run", "allow", "ENTITLED"),
        ("dry_run", "deny", "CHANNEL_NOT_ALLOWED"),
    ]


async def test_a_grant_revoked_between_plan_and_delivery_stops_the_delivery(
    licensed: dict,
    access: AccessService,
    client_for: AgentClient,
    db: asyncpg.Connection,
    runtime,
    receiver: WebhookReceiver,
):
    granted = await grant(access, licensed["reseller"], licensed["item"])
    async with client_for(licensed["reseller_key"]) as client:
        plan = await plan_licensed(client, licensed, "webhook")
        await access.revoke_entitlement(granted.id)
        assert await Worker(runtime).run_once() == 1
        after = await call(client, "get_plan", planId=plan["id"])
        receipts = (await call(client, "get_receipts", planId=plan["id"]))["receipts"]
    assert receiver.requests == [], "the revoked grant's job was sent"
    assert after["status"] == "failed" and after["jobs"][0]["lastError"].startswith("ENTITLEMENT_REVOKED:")
    assert [r["succeeded"] for r in receipts] == [False] and receipts[0]["errorMessage"].startswith(
        "ENTITLEMENT_REVOKED"
    )
    logged = await db.fetchrow("SELECT outcome, code, job_id FROM entitlement_decisions WHERE stage = 'delivery'")
    assert tuple(logged) == ("deny", "ENTITLEMENT_REVOKED", uuid.UUID(after["jobs"][0]["id"]))


async def test_a_grant_still_held_at_delivery_is_logged_and_delivered(
    licensed: dict,
    access: AccessService,
    client_for: AgentClient,
    db: asyncpg.Connection,
    runtime,
    receiver: WebhookReceiver,
):
    await grant(access, licensed["reseller"], licensed["item"], max_distributions=1)
    async with client_for(licensed["reseller_key"]) as client:
        plan = await plan_licensed(client, licensed, "webhook")
        # Spending the last of the budget exhausts the grant, but not the job it was spent for.
        assert (await call(client, "get_my_entitlements"))["entitlements"][0]["status"] == "exhausted"
        assert await Worker(runtime).run_once() == 1
        assert (await call(client, "get_plan", planId=plan["id"]))["status"] == "succeeded"
    assert len(receiver.requests) == 1
    logged = await db.fetchrow("SELECT outcome, code FROM entitlement_decisions WHERE stage = 'delivery'")
    assert tuple(logged) == ("allow", "ENTITLED")


async def test_an_expiry_reached_before_delivery_stops_the_delivery(
    licensed: dict, access: AccessService, client_for: AgentClient, settings: Settings, receiver: WebhookReceiver
):
    await grant(access, licensed["reseller"], licensed["item"], expires_at=datetime.now(UTC) + timedelta(hours=1))
    async with client_for(licensed["reseller_key"]) as client:
        plan = await plan_licensed(client, licensed, "webhook")
        # The worker's clock is two hours on: the grant has expired by the time it delivers.
        from wordclaw_mcp.runtime import Runtime

        async with Runtime.open(replace(settings, clock_offset=7200)) as later:
            assert await Worker(later).run_once() == 1
        after = await call(client, "get_plan", planId=plan["id"])
    assert receiver.requests == []
    assert after["jobs"][0]["lastError"].startswith("ENTITLEMENT_EXPIRED:")


async def test_two_concurrent_plans_cannot_overspend_a_budget_of_one(
    licensed: dict, access: AccessService, client_for: AgentClient, db: asyncpg.Connection
):
    granted = await grant(access, licensed["reseller"], licensed["item"], max_distributions=1)
    answers: list[Any] = []
    async with client_for(licensed["reseller_key"]) as first, client_for(licensed["reseller_key"]) as second:

        async def plan(client: Client) -> None:
            result = await client.call_tool(
                "create_distribution_plan",
                {
                    "contentItemId": licensed["item"]["id"],
                    "targetIds": [licensed["webhook"]["id"]],
                    "allowDuplicate": True,
                },
            )
            answers.append(answer_of(result))

        async with anyio.create_task_group() as tg:
            tg.start_soon(plan, first)
            tg.start_soon(plan, second)
    codes = sorted((answer.get("error") or {}).get("code", "PLANNED") for answer in answers)
    assert codes == ["ENTITLEMENT_EXHAUSTED", "PLANNED"], answers
    assert await job_count(db) == 1
    assert await db.fetchval("SELECT distributions_used FROM entitlements WHERE id = $1", granted.id) == 1


async def test_a_plan_needing_more_than_the_budget_left_is_refused_whole(
    licensed: dict, access: AccessService, client_for: AgentClient, db: asyncpg.Connection, receiver: WebhookReceiver
):
    await grant(access, licensed["reseller"], licensed["item"], max_distributions=1)
    async with client_for(licensed["reseller_key"]) as client:
        error = await refused_plan(client, licensed, "webhook", "rss")
    assert error["code"] == "ENTITLEMENT_EXHAUSTED" and error["details"]["remaining"] == 1
    assert await job_count(db) == 0
    assert await db.fetchval("SELECT distributions_used FROM entitlements") == 0


# --- the duplicate rule and idempotency keys --------------------------------------------------------


async def plan_args(client: Client, url: str) -> dict[str, Any]:
    item, target = await item_and_webhook(client, url)
    return {"contentItemId": item["id"], "targetIds": [target["id"]]}


async def test_a_second_plan_for_the_same_item_and_target_within_five_minutes_is_a_duplicate(
    mcp_client_no_worker: Client, settings: Settings, receiver: WebhookReceiver, db: asyncpg.Connection
):
    args = await plan_args(mcp_client_no_worker, receiver.url)
    first = await call(mcp_client_no_worker, "create_distribution_plan", **args)
    error = await call_error(mcp_client_no_worker, "create_distribution_plan", **args)
    assert error["code"] == "DUPLICATE_DISTRIBUTION_PLAN"
    assert error["details"]["existingPlanId"] == first["id"] and error["details"]["targetIds"] == args["targetIds"]
    assert first["id"] in error["message"] and "allowDuplicate" in error["remediation"]
    assert await job_count(db) == 1

    again = await call(mcp_client_no_worker, "create_distribution_plan", **args, allowDuplicate=True)
    assert again["id"] != first["id"]
    # Five minutes and a second later (the test moves the clock the rule reads), it is no duplicate.
    async with Client(build_server(replace(settings, clock_offset=301))) as later:
        after_window = await call(later, "create_distribution_plan", **args)
    assert after_window["id"] not in (first["id"], again["id"])
    assert await job_count(db) == 3


async def test_a_cancelled_plan_does_not_block_a_new_one(mcp_client_no_worker: Client, receiver: WebhookReceiver):
    args = await plan_args(mcp_client_no_worker, receiver.url)
    first = await call(mcp_client_no_worker, "create_distribution_plan", **args)
    await call(mcp_client_no_worker, "cancel_plan", planId=first["id"])
    assert (await call(mcp_client_no_worker, "create_distribution_plan", **args))["status"] == "queued"


async def race(client_count: int, settings: Settings, arguments: dict[str, Any]) -> list[dict[str, Any]]:
    """``client_count`` sessions, each connected first, then calling create_distribution_plan with
    ``arguments`` all at once."""
    answers: list[dict[str, Any]] = []
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client(build_server(settings))) for _ in range(client_count)]
        go = anyio.Event()

        async def one(client: Client) -> None:
            await go.wait()
            result = await client.call_tool("create_distribution_plan", arguments)
            answers.append(answer_of(result))

        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(one, client)
            await anyio.wait_all_tasks_blocked()
            go.set()
    return answers


async def test_eight_racing_identical_plans_make_one(
    mcp_client_no_worker: Client, settings: Settings, receiver: WebhookReceiver, db: asyncpg.Connection
):
    args = await plan_args(mcp_client_no_worker, receiver.url)
    answers = await race(8, settings, args)
    planned = [answer for answer in answers if "error" not in answer]
    duplicates = [answer["error"] for answer in answers if "error" in answer]
    assert len(planned) == 1 and len(duplicates) == 7, answers
    assert {error["code"] for error in duplicates} == {"DUPLICATE_DISTRIBUTION_PLAN"}
    assert {error["details"]["existingPlanId"] for error in duplicates} == {planned[0]["id"]}
    assert await db.fetchval("SELECT count(*) FROM distribution_plans") == 1


async def test_an_idempotency_key_replays_the_first_plan_and_refuses_other_arguments(
    mcp_client_no_worker: Client, settings: Settings, receiver: WebhookReceiver, db: asyncpg.Connection
):
    args = await plan_args(mcp_client_no_worker, receiver.url)
    first = await call(mcp_client_no_worker, "create_distribution_plan", **args, idempotencyKey="order-42")
    replay = await call(mcp_client_no_worker, "create_distribution_plan", **args, idempotencyKey="order-42")
    assert replay["id"] == first["id"] and replay["jobs"] == first["jobs"]
    assert await job_count(db) == 1

    other = await call_error(
        mcp_client_no_worker, "create_distribution_plan", **args, idempotencyKey="order-42", allowDuplicate=True
    )
    assert other["code"] == "IDEMPOTENCY_KEY_REUSED" and other["details"]["existingPlanId"] == first["id"]
    assert await job_count(db) == 1

    # A day later the key is free again (the duplicate window has long passed too).
    async with Client(build_server(replace(settings, clock_offset=24 * 3600 + 1))) as tomorrow:
        fresh = await call(tomorrow, "create_distribution_plan", **args, idempotencyKey="order-42")
    assert fresh["id"] != first["id"] and await job_count(db) == 2


async def test_eight_racing_calls_with_one_idempotency_key_all_get_the_one_plan(
    mcp_client_no_worker: Client, settings: Settings, receiver: WebhookReceiver, db: asyncpg.Connection
):
    args = await plan_args(mcp_client_no_worker, receiver.url)
    answers = await race(8, settings, {**args, "idempotencyKey": "retry-me"})
    assert all("error" not in answer for answer in answers), answers
    assert len({answer["id"] for answer in answers}) == 1
    assert await db.fetchval("SELECT count(*) FROM distribution_plans") == 1
    assert await job_count(db) == 1


async def test_idempotency_keys_are_each_agents_own(
    access: AccessService, client_for: AgentClient, receiver: WebhookReceiver
):
    _a, first_key = await new_agent(access, "first")
    _b, second_key = await new_agent(access, "second")
    async with client_for(first_key) as first, client_for(second_key) as second:
        one = await call(first, "create_distribution_plan", **await plan_args(first, receiver.url), idempotencyKey="k")
        item, target = await item_and_webhook(second, receiver.url, name="other-hook")
        two = await call(
            second, "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"]], idempotencyKey="k"
        )
    assert one["id"] != two["id"]


# --- the operator's commands ------------------------------------------------------------------------


async def test_operators_manage_agents_and_entitlements_from_the_command_line(
    settings: Settings,
    service: DistributionService,
    client_for: AgentClient,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    from wordclaw_mcp.cli import main

    monkeypatch.setenv("WORDCLAW_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("WORDCLAW_HOME", str(settings.home))

    async def run(*argv: str) -> list[str]:
        assert await anyio.to_thread.run_sync(main, list(argv)) == 0
        return capsys.readouterr().out.splitlines()

    created = await run(
        "agents", "create", "newsroom", "--scopes", "distribution:read,distribution:write", "--tenant", "acme"
    )
    [key] = [line.removeprefix("key: ") for line in created if line.startswith("key: ")]
    agent_id = created[0].split("\t")[0]
    assert key.startswith("wck_") and "shown once" in created[-1]
    listed = await run("agents", "list")
    assert any(line.startswith(agent_id) and "acme" in line for line in listed)
    assert key not in "\n".join(listed) and f"wck_{key[4:12]}…" in "\n".join(listed)

    owner, owner_key = await new_agent(service.access, "owner", tenant="acme")
    async with client_for(owner_key) as client:
        item, target = await item_and_webhook(client, receiver.url)
    granted = await run(
        "entitlements",
        "grant",
        "--agent",
        agent_id,
        "--item",
        item["id"],
        "--channels",
        "webhook",
        "--allow-redistribution",
        "--max-distributions",
        "3",
        "--expires-in-days",
        "30",
    )
    grant_id = granted[0].split("\t")[0]
    assert "\tactive\twebhook\tyes\t-\t0/3\t" in granted[0]
    async with client_for(key) as client:
        plan = await call(client, "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"]])
        assert plan["status"] == "queued"
        assert (await run("entitlements", "list", "--agent", agent_id))[1].startswith(f"{grant_id}\t")
        assert "\trevoked\t" in (await run("entitlements", "revoke", grant_id))[0]
        denied = await call_error(
            client, "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"]], allowDuplicate=True
        )
        assert denied["code"] == "ENTITLEMENT_REVOKED"

    revoked = await run("agents", "revoke", agent_id)
    assert revoked[0].split("\t")[-1] != "-"
    with pytest.raises(DistributionError) as refused:
        await service.access.authenticate(key)
    assert refused.value.code == "AGENT_KEY_INVALID"

    # Bad input is one coded line and exit code 2, never a traceback.
    assert (
        await anyio.to_thread.run_sync(
            main,
            ["entitlements", "grant", "--agent", str(owner.id), "--item", str(uuid.uuid4()), "--allow-redistribution"],
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("wordclaw: CONTENT_ITEM_NOT_FOUND: ")
    assert await anyio.to_thread.run_sync(main, ["agents", "revoke", str(uuid.uuid4())]) == 2
    assert capsys.readouterr().err.startswith("wordclaw: AGENT_NOT_FOUND: ")
    with pytest.raises(SystemExit):
        main(["agents", "create", "x", "--scopes", "publish:everything"])
    assert "unknown scope(s) publish:everything" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "code"),
    [({"WORDCLAW_AGENT_KEY": "wck_" + "Z" * 43}, "AGENT_KEY_INVALID"), ({}, "AGENT_KEY_REQUIRED")],
)
async def test_a_stdio_server_without_a_valid_agent_refuses_to_start_with_one_line(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    code: str,
):
    from wordclaw_mcp.cli import mcp_main

    monkeypatch.setenv("WORDCLAW_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("WORDCLAW_HOME", str(settings.home))
    monkeypatch.delenv("WORDCLAW_LOCAL_AGENT", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert await anyio.to_thread.run_sync(mcp_main, ["--no-worker"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"wordclaw-mcp: {code}: ") and "Traceback" not in line
