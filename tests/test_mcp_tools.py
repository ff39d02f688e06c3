"""The MCP surface, through the SDK's real in-process client."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

import anyio
import asyncpg
import pytest
from cryptography.fernet import Fernet
from mcp import Client

from tests.helpers import call, call_error, database_name, new_signing_secret, terminate_lock_waiters
from wordclaw_mcp.config import Settings
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.server import build_server

pytestmark = pytest.mark.anyio

TOOL_ARGUMENTS = {
    "upsert_content_item": {"id", "title", "body", "bodyFormat", "summary", "canonicalUrl", "metadata"},
    "register_target": {
        "name",
        "channelType",
        "config",
        "secrets",
        "maxConcurrency",
        "ratePerMinute",
        "transformPolicy",
    },
    "list_targets": set(),
    "create_distribution_plan": {
        "contentItemId",
        "targetIds",
        "transformPolicy",
        "awaitDelivery",
        "dryRun",
        "allowDuplicate",
        "idempotencyKey",
    },
    "get_plan": {"planId"},
    "cancel_plan": {"planId"},
    "get_receipts": {"planId"},
    "retry_plan": {"planId", "jobIds"},
    "rotate_target_secret": {"targetId", "graceHours"},
    "get_my_entitlements": set(),
}


async def content_and_target(client: Client, url: str, **target_extra) -> tuple[dict, dict]:
    item = await call(client, "upsert_content_item", title="Launch", body="We **shipped**.", summary="News")
    target = await call(
        client,
        "register_target",
        name=f"hook-{uuid.uuid4().hex[:6]}",
        channelType="webhook",
        config={"url": url},
        **target_extra,
    )
    return item, target


async def test_tools_publish_camelcase_input_and_output_schemas(mcp_client: Client) -> None:
    tools = {tool.name: tool for tool in (await mcp_client.list_tools()).tools}
    assert set(tools) == set(TOOL_ARGUMENTS)
    for name, arguments in TOOL_ARGUMENTS.items():
        assert set(tools[name].input_schema.get("properties", {})) == arguments, name
        assert tools[name].output_schema is not None, name
    plan_output = tools["create_distribution_plan"].output_schema
    assert {"id", "status", "jobs", "receipts", "previews", "awaitTimedOut"} <= set(plan_output["properties"])
    assert tools["create_distribution_plan"].input_schema["required"] == ["contentItemId", "targetIds"]
    assert tools["create_distribution_plan"].input_schema["properties"]["targetIds"]["minItems"] == 1


async def test_an_agent_publishes_to_a_webhook_and_awaits_the_receipt(
    mcp_client: Client, receiver: WebhookReceiver
) -> None:
    item, target = await content_and_target(mcp_client, receiver.url)
    assert item["version"] == 1 and uuid.UUID(item["id"])
    assert target["config"] == {"url": receiver.url} and target["hasSecrets"] is True
    # No secret was given, so one was made: shown here once, and never listed.
    generated = target["generatedSecrets"]["signingSecret"]
    assert generated.startswith("whsec_")
    listed = await call(mcp_client, "list_targets")
    assert generated not in json.dumps(listed) and listed["targets"][0]["generatedSecrets"] is None

    plan = await call(
        mcp_client,
        "create_distribution_plan",
        contentItemId=item["id"],
        targetIds=[target["id"]],
        awaitDelivery=True,
    )
    assert plan["status"] == "succeeded"
    assert plan["awaitTimedOut"] is False
    [job] = plan["jobs"]
    assert (job["targetId"], job["status"], job["attempt"]) == (target["id"], "succeeded", 1)
    [receipt] = plan["receipts"]
    assert (receipt["jobId"], receipt["succeeded"], receipt["statusCode"]) == (job["id"], True, 200)
    assert json.loads(receiver.requests[0].body)["data"]["title"] == "Launch"

    fetched = await call(mcp_client, "get_plan", planId=plan["id"])
    assert fetched["status"] == "succeeded" and fetched["jobs"] == plan["jobs"]
    receipts = await call(mcp_client, "get_receipts", planId=plan["id"])
    assert receipts == {"planId": plan["id"], "receipts": plan["receipts"]}


async def test_dry_run_returns_payloads_and_queues_nothing(
    mcp_client_no_worker: Client, receiver: WebhookReceiver, settings: Settings
) -> None:
    item, target = await content_and_target(mcp_client_no_worker, receiver.url)
    preview = await call(
        mcp_client_no_worker,
        "create_distribution_plan",
        contentItemId=item["id"],
        targetIds=[target["id"]],
        dryRun=True,
        transformPolicy={"bodyFormat": "html", "maxLength": 5},
    )
    assert preview["status"] == "dry_run" and preview["id"] is None and preview["jobs"] == []
    [only] = preview["previews"]
    assert only["targetId"] == target["id"] and only["channelType"] == "webhook"
    assert only["payload"]["data"]["body"] == "<p>We…</p>\n"
    # What was counted against what, and where the text was cut (in its Markdown source).
    assert (only["length"], only["limit"], only["truncated"], only["cutAt"]) == (3, 5, True, 2)
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM distribution_plans") == 0
        assert await conn.fetchval("SELECT count(*) FROM distribution_jobs") == 0
    finally:
        await conn.close()
    assert receiver.requests == []


async def test_a_targets_default_policy_applies_and_a_plans_policy_wins_field_by_field(
    mcp_client_no_worker: Client, receiver: WebhookReceiver
) -> None:
    default = {"outputFormat": "html", "hashtags": ["#news"], "utm": {"source": "hook"}}
    item, target = await content_and_target(mcp_client_no_worker, receiver.url, transformPolicy=default)
    shown = target["transformPolicy"]
    assert (shown["outputFormat"], shown["hashtags"], shown["utm"]) == ("html", ["news"], {"source": "hook"})

    async def data(policy: dict | None) -> dict:
        extra = {"transformPolicy": policy} if policy is not None else {}
        plan = await call(
            mcp_client_no_worker,
            "create_distribution_plan",
            contentItemId=item["id"],
            targetIds=[target["id"]],
            dryRun=True,
            **extra,
        )
        return plan["previews"][0]["payload"]["data"]

    alone = await data(None)
    assert (alone["bodyFormat"], alone["body"], alone["hashtags"]) == (
        "html",
        "<p>We <strong>shipped</strong>.</p>\n",
        ["news"],
    )
    over = await data({"outputFormat": "plaintext", "hashtags": []})
    assert (over["bodyFormat"], over["body"]) == ("plaintext", "We shipped.")
    assert "hashtags" not in over, "the plan's empty list wins over the target's"
    # Fields the plan does not set keep the target's: here the output format.
    assert (await data({"maxLength": 100}))["bodyFormat"] == "html"


async def test_cancel_plan_cancels_queued_jobs(mcp_client_no_worker: Client, receiver: WebhookReceiver) -> None:
    item, target = await content_and_target(mcp_client_no_worker, receiver.url)
    plan = await call(
        mcp_client_no_worker, "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"]]
    )
    assert plan["status"] == "queued" and plan["jobs"][0]["status"] == "queued"
    cancelled = await call(mcp_client_no_worker, "cancel_plan", planId=plan["id"])
    assert cancelled["status"] == "cancelled"
    assert [job["status"] for job in cancelled["jobs"]] == ["cancelled"]
    assert (await call(mcp_client_no_worker, "get_receipts", planId=plan["id"]))["receipts"] == []


async def test_updating_a_content_item_bumps_its_version(mcp_client_no_worker: Client) -> None:
    item = await call(
        mcp_client_no_worker,
        "upsert_content_item",
        title="A",
        body="b",
        canonicalUrl="https://example.com/a",
        metadata={"tags": ["x"]},
    )
    again = await call(mcp_client_no_worker, "upsert_content_item", id=item["id"], title="B", body="b")
    assert (again["id"], again["version"], again["title"]) == (item["id"], 2, "B")
    assert item["canonicalUrl"] == "https://example.com/a" and item["metadata"] == {"tags": ["x"]}


async def test_secrets_are_write_only(mcp_client_no_worker: Client, receiver: WebhookReceiver) -> None:
    secret = new_signing_secret()
    _, target = await content_and_target(mcp_client_no_worker, receiver.url, secrets={"signingSecret": secret})
    assert target["hasSecrets"] is True
    listed = await mcp_client_no_worker.call_tool("list_targets", {})
    assert [t["id"] for t in listed.structured_content["targets"]] == [target["id"]]
    assert secret not in json.dumps(listed.structured_content) and secret not in listed.content[0].text
    assert secret not in json.dumps(target)


UNKNOWN = "00000000-0000-4000-8000-000000000000"


async def test_unknown_ids_are_coded_errors(mcp_client_no_worker: Client, receiver: WebhookReceiver) -> None:
    client = mcp_client_no_worker
    item, target = await content_and_target(client, receiver.url)

    error = await call_error(client, "create_distribution_plan", contentItemId=UNKNOWN, targetIds=[target["id"]])
    assert error["code"] == "CONTENT_ITEM_NOT_FOUND" and UNKNOWN in error["message"]
    error = await call_error(
        client, "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"], UNKNOWN]
    )
    assert error["code"] == "TARGET_NOT_FOUND" and error["details"]["missingTargetIds"] == [UNKNOWN]
    for tool in ("get_plan", "cancel_plan", "get_receipts"):
        assert (await call_error(client, tool, planId=UNKNOWN))["code"] == "PLAN_NOT_FOUND"
    assert (await call_error(client, "upsert_content_item", id=UNKNOWN, title="t", body="b"))["code"] == (
        "CONTENT_ITEM_NOT_FOUND"
    )


@pytest.mark.parametrize(
    ("tool", "arguments", "code", "mentions"),
    [
        (
            "register_target",
            {"name": "n", "channelType": "webhook", "config": {"url": "not a url"}},
            "INVALID_TARGET_CONFIG",
            "config.url",
        ),
        (
            "register_target",
            {"name": "n", "channelType": "webhook", "config": {"url": "ftp://example.com/x"}},
            "INVALID_TARGET_CONFIG",
            "config.url",
        ),
        (
            "register_target",
            {"name": "n", "channelType": "webhook", "config": {}},
            "INVALID_TARGET_CONFIG",
            "config.url",
        ),
        (
            "register_target",
            {"name": "n", "channelType": "carrier-pigeon", "config": {}},
            "UNSUPPORTED_CHANNEL_TYPE",
            "carrier-pigeon",
        ),
        ("create_distribution_plan", {"contentItemId": UNKNOWN, "targetIds": []}, "VALIDATION_ERROR", "targetIds"),
        (
            "create_distribution_plan",
            {"contentItemId": "not-a-uuid", "targetIds": [UNKNOWN]},
            "VALIDATION_ERROR",
            "contentItemId",
        ),
        (
            "create_distribution_plan",
            {"contentItemId": UNKNOWN, "targetIds": [UNKNOWN, UNKNOWN]},
            "VALIDATION_ERROR",
            "more than once",
        ),
        ("create_distribution_plan", {"contentItemId": UNKNOWN, "targets": [UNKNOWN]}, "VALIDATION_ERROR", "targets"),
        (
            "create_distribution_plan",
            {"contentItemId": UNKNOWN, "targetIds": [UNKNOWN], "transformPolicy": {"bodyFormat": "pdf"}},
            "VALIDATION_ERROR",
            "bodyFormat",
        ),
        ("upsert_content_item", {"title": "", "body": "b"}, "VALIDATION_ERROR", "title"),
        ("get_plan", {}, "VALIDATION_ERROR", "planId"),
        ("no_such_tool", {}, "UNKNOWN_TOOL", "no_such_tool"),
    ],
)
async def test_bad_input_is_a_coded_error(
    mcp_client_no_worker: Client, tool: str, arguments: dict, code: str, mentions: str
) -> None:
    error = await call_error(mcp_client_no_worker, tool, **arguments)
    assert error["code"] == code
    assert mentions in error["message"]
    assert error["remediation"]


async def test_a_bad_signing_secret_is_refused_without_echoing_it(mcp_client_no_worker: Client) -> None:
    error = await call_error(
        mcp_client_no_worker,
        "register_target",
        name="n",
        channelType="webhook",
        config={"url": "https://example.com/h"},
        secrets={"signingSecret": "hunter2-not-whsec"},
    )
    assert error["code"] == "INVALID_TARGET_SECRETS"
    assert "hunter2" not in json.dumps(error)


async def test_duplicate_target_names_are_refused(mcp_client_no_worker: Client) -> None:
    args = {"name": "same", "channelType": "webhook", "config": {"url": "https://example.com/h"}}
    await call(mcp_client_no_worker, "register_target", **args)
    assert (await call_error(mcp_client_no_worker, "register_target", **args))["code"] == "TARGET_NAME_TAKEN"


async def test_private_addresses_are_refused_by_default(settings: Settings) -> None:
    async with Client(build_server(replace(settings, allow_private_targets=False))) as client:
        for url in (
            "http://127.0.0.1:8080/h",
            "http://localhost/h",
            "http://169.254.169.254/latest",
            "http://[::ffff:10.0.0.1]/h",
        ):
            error = await call_error(client, "register_target", name=url, channelType="webhook", config={"url": url})
            assert error["code"] == "TARGET_ADDRESS_FORBIDDEN", url
            assert "WORDCLAW_ALLOW_PRIVATE_TARGETS" in error["remediation"]


async def test_await_delivery_returns_the_current_state_after_ten_seconds(
    mcp_client: Client, receiver: WebhookReceiver
) -> None:
    receiver.behaviour.hang = True
    item, target = await content_and_target(mcp_client, receiver.url)
    started = time.monotonic()
    plan = await call(
        mcp_client, "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"]], awaitDelivery=True
    )
    elapsed = time.monotonic() - started
    assert 9.5 <= elapsed < 14, elapsed
    assert plan["awaitTimedOut"] is True
    assert plan["status"] in {"queued", "running"}
    assert plan["jobs"][0]["status"] in {"queued", "running"}


async def test_a_lost_database_connection_is_a_coded_error_and_the_next_call_recovers(
    mcp_client_no_worker: Client, settings: Settings, postgres_server_url: str
) -> None:
    database = database_name(settings.database_url)
    await call(mcp_client_no_worker, "list_targets")
    blocker = await asyncpg.connect(settings.database_url)
    try:
        async with anyio.create_task_group() as tg, blocker.transaction():
            # The tool's query waits on this lock, so its connection is certainly killed mid-call
            # (one killed while idle may be replaced by the pool before anyone notices).
            await blocker.execute("LOCK TABLE distribution_targets IN ACCESS EXCLUSIVE MODE")
            outcome: dict = {}

            async def list_targets() -> None:
                outcome["result"] = await mcp_client_no_worker.call_tool("list_targets", {})

            tg.start_soon(list_targets)
            assert await terminate_lock_waiters(postgres_server_url, database) == 1
    finally:
        await blocker.close()
    result = outcome["result"]
    assert result.is_error
    error = json.loads(result.content[0].text)["error"]
    assert error["code"] == "DATABASE_UNAVAILABLE", error
    assert error["remediation"].startswith("Retry")
    assert (await call(mcp_client_no_worker, "list_targets"))["targets"] == []


@pytest.mark.parametrize(
    ("tool", "arguments", "field"),
    [
        ("upsert_content_item", {"title": "a\x00b", "body": "b"}, "title"),
        ("upsert_content_item", {"title": "t", "body": "b\x00"}, "body"),
        ("upsert_content_item", {"title": "t", "body": "b", "summary": "\x00"}, "summary"),
        ("upsert_content_item", {"title": "t", "body": "b", "metadata": {"k\x00": "v"}}, "metadata"),
        ("upsert_content_item", {"title": "t", "body": "b", "metadata": {"k": {"deep": ["\x00"]}}}, "metadata"),
        ("register_target", {"name": "n\x00", "channelType": "webhook", "config": {"url": "https://e.com"}}, "name"),
        (
            "register_target",
            {"name": "n", "channelType": "webhook", "config": {"url": "https://e.com", "x": "\x00"}},
            "config",
        ),
    ],
)
async def test_nul_characters_in_arguments_are_validation_errors_naming_the_field(
    mcp_client_no_worker: Client, tool: str, arguments: dict, field: str
) -> None:
    error = await call_error(mcp_client_no_worker, tool, **arguments)
    assert error["code"] == "VALIDATION_ERROR", error
    assert f"{field}: " in error["message"] and "NUL" in error["message"]


async def test_a_server_whose_keys_decrypt_no_stored_secret_refuses_to_start(
    settings: Settings, receiver: WebhookReceiver
) -> None:
    async with Client(build_server(settings)) as client:
        await content_and_target(client, receiver.url, secrets={"signingSecret": new_signing_secret()})
    wrong = replace(settings, run_worker=True, secret_keys=(Fernet.generate_key().decode(),))
    with pytest.raises(DistributionError) as refused:
        async with Client(build_server(wrong)):
            pass
    assert refused.value.code == "SECRET_KEY_MISMATCH"
    assert receiver.requests == []


FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # five code points, one grapheme


async def test_a_dry_run_shows_a_mastodon_status_counted_as_mastodon_counts(mcp_client: Client) -> None:
    # 200 family emoji are 200 graphemes, not 1,000 code points, and a remote mention counts as
    # its user part (Mastodon's StatusLengthValidator): the status fits whole.
    item = await call(
        mcp_client, "upsert_content_item", title="T", body="", summary=FAMILY * 200 + " @alice@mastodon.social"
    )
    target = await call(
        mcp_client,
        "register_target",
        name="toots",
        channelType="mastodon",
        config={"baseUrl": "http://127.0.0.1:9"},
        secrets={"accessToken": "token"},
    )
    plan = await call(
        mcp_client,
        "create_distribution_plan",
        contentItemId=item["id"],
        targetIds=[target["id"]],
        dryRun=True,
        transformPolicy={"includeBody": False},
    )
    (preview,) = plan["previews"]
    assert (preview["length"], preview["limit"], preview["truncated"]) == (1 + 2 + 200 + 1 + 6, 500, False)
    assert preview["payload"]["status"].endswith(FAMILY + " @alice@mastodon.social")


async def test_html_nested_too_deep_is_a_validation_error_not_an_internal_one(mcp_client: Client) -> None:
    html = "<div>" * 3000 + "deep" + "</div>" * 3000
    error = await call_error(mcp_client, "upsert_content_item", title="T", body=html, bodyFormat="html")
    assert error["code"] == "VALIDATION_ERROR"
    assert "nested more than 100 deep" in error["message"] and "bodyFormat: markdown" in error["remediation"]
