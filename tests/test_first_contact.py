"""What a new user meets first: the commands' start, end, version and mistakes, and the examples."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import uuid
from importlib.metadata import version
from pathlib import Path

import anyio
import asyncpg
import httpx2
import pytest
from anyio.streams.text import TextReceiveStream
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from tests.helpers import call, database_name, eventually, publish
from tests.test_processes import BIN, external_database_env
from wordclaw_mcp.config import Settings
from wordclaw_mcp.database import transaction
from wordclaw_mcp.models import PlanRef
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.server import TOOLS, build_server
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).parent.parent / "examples"
PACKAGE_VERSION = version("wordclaw-distribution")


async def run(*command: str, env: dict[str, str]) -> tuple[int, str, str]:
    with anyio.fail_after(60):
        done = await anyio.run_process([str(BIN / command[0]), *command[1:]], env=env, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def new_agent_key(env: dict[str, str]) -> tuple[str, str]:
    """An agent made as an operator makes one: its id and key."""
    code, out, err = await run("wordclaw", "agents", "create", "first-contact", "--scopes", "admin", env=env)
    assert code == 0, err
    [key] = [line.removeprefix("key: ") for line in out.splitlines() if line.startswith("key: ")]
    return out.split("\t")[0], key


# --- the end of a stdio session -------------------------------------------------------------------


async def test_a_stdio_session_that_ends_during_a_call_leaves_no_error_on_stderr(
    database_url: str, tmp_path: Path
) -> None:
    env = external_database_env(database_url, tmp_path)
    params = StdioServerParameters(command=str(BIN / "wordclaw-mcp"), args=["--no-worker"], env=env)
    errlog = tmp_path / "stderr.log"
    locker = await asyncpg.connect(database_url)
    try:
        with errlog.open("w") as err:
            async with Client(stdio_client(params, errlog=err)) as client:
                item = await call(client, "upsert_content_item", title="Ends mid-call", body="b")
                target = await call(
                    client, "register_target", name="hook", channelType="webhook", config={"url": "http://127.0.0.1:9/"}
                )
                await call(client, "list_targets")
                # The plan's transaction waits on this lock when the session ends, as a call does when
                # the user closes their client while it runs: the server cancels the call inside it.
                async with locker.transaction():
                    await locker.execute("LOCK TABLE distribution_plans IN ACCESS EXCLUSIVE MODE")
                    async with anyio.create_task_group() as calls:
                        arguments = {"contentItemId": item["id"], "targetIds": [target["id"]]}
                        calls.start_soon(client.call_tool, "create_distribution_plan", arguments)
                        await eventually(lambda: _waiting_on_a_lock(database_url))
                        calls.cancel_scope.cancel()
    finally:
        await locker.close()
    said = errlog.read_text()
    assert "ERROR" not in said and "Traceback" not in said, said
    assert await _count(database_url, "SELECT count(*) FROM distribution_plans") == 0


async def _waiting_on_a_lock(database_url: str) -> bool:
    """Whether a session on the database waits on a lock. Asked on a connection of its own: one in a
    transaction would see pg_stat_activity as it was when the transaction first read it."""
    conn = await asyncpg.connect(database_url)
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                database_name(database_url),
            )
        )
    finally:
        await conn.close()


async def _count(database_url: str, sql: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_a_transaction_cancelled_inside_ends_before_its_connection_goes_back_to_the_pool(
    service: DistributionService, db: asyncpg.Connection, database_url: str
) -> None:
    # asyncpg reports a connection released in a transaction through the loop's exception handler.
    reported: list[str] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))

    async def insert() -> None:
        async with service.pool.acquire() as conn, transaction(conn):
            await conn.execute("INSERT INTO tenants (id) VALUES ('cancelled-inside')")

    try:
        async with db.transaction():
            # The insert waits on this lock when it is cancelled, as a call does when its session ends.
            await db.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(insert)
                await eventually(lambda: _waiting_on_a_lock(database_url))
                tasks.cancel_scope.cancel()
    finally:
        loop.set_exception_handler(previous)
    assert reported == []
    assert await db.fetchval("SELECT count(*) FROM tenants WHERE id = 'cancelled-inside'") == 0


def test_every_transaction_goes_through_the_one_that_always_ends() -> None:
    root = Path(__file__).parent.parent
    sources = [*(root / "wordclaw_mcp").rglob("*.py"), *(root / "queue_worker").rglob("*.py")]
    direct = [
        f"{path}:{number}"
        for path in sources
        if path.name != "database.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ".transaction(" in line
    ]
    assert direct == [], "use wordclaw_mcp.database.transaction(conn), not conn.transaction()"


# --- tool errors ---------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.uuids().map(str),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
TOOL_CALLS = st.tuples(
    st.sampled_from([spec.name for spec in TOOLS] + ["no_such_tool"]),
    st.dictionaries(
        st.sampled_from(["planId", "targetId", "contentItemId", "targetIds", "title", "body", "name", "config"])
        | st.text(max_size=10),
        JSON_VALUES,
        max_size=4,
    ),
)


async def test_every_tool_error_is_coded_json_text_with_no_structured_content(mcp_client_no_worker: Client) -> None:
    """Whatever the arguments: an error is readable by every client (its JSON in the text, nothing in
    structuredContent for the output schema to reject), and a success matches its output schema
    (the SDK's client checks it)."""

    async def make_calls(calls: list[tuple[str, dict]]) -> None:
        for tool, arguments in calls:
            result = await mcp_client_no_worker.call_tool(tool, arguments)
            if not result.is_error:
                continue
            assert result.structured_content is None, (tool, arguments, result)
            [block] = result.content
            error = json.loads(block.text)["error"]
            assert re.fullmatch(r"[A-Z][A-Z_]+", error["code"]) and error["message"] and error["remediation"]

    # Hypothesis drives from a thread; the calls run on this test's event loop, where the client lives.
    @hypothesis_settings(max_examples=40, deadline=None)
    @given(calls=st.lists(TOOL_CALLS, min_size=1, max_size=6))
    def check(calls: list[tuple[str, dict]]) -> None:
        anyio.from_thread.run(make_calls, calls)

    await anyio.to_thread.run_sync(check)


# --- the HTTP server --------------------------------------------------------------------------------


async def test_the_http_server_says_where_it_serves_and_takes_each_requests_agent_from_its_bearer_key(
    database_url: str, tmp_path: Path
) -> None:
    # Every process of a deployment may share one env file; a key in it means nothing over HTTP.
    env = external_database_env(database_url, tmp_path) | {"WORDCLAW_AGENT_KEY": "wck_" + "Z" * 43}
    agent_id, key = await new_agent_key(env)
    command = [str(BIN / "wordclaw-mcp"), "--transport", "streamable-http", "--port", "0", "--no-worker"]
    async with await anyio.open_process(command, env=env) as server:
        try:
            said = ""
            with anyio.fail_after(30):
                async for chunk in TextReceiveStream(server.stderr):
                    said += chunk
                    if match := re.search(r"wordclaw-mcp: serving MCP at (http://127\.0\.0\.1:\d+/mcp)\n", said):
                        break
            assert match, said
            assert "WORDCLAW_AGENT_KEY is not used over HTTP" in said
            url = match.group(1)
            # As the README sets a client up: the key in a bearer header, and a timeout longer than
            # awaitDelivery's 10 s.
            async with (
                httpx2.AsyncClient(
                    headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30, read=60)
                ) as http,
                Client(streamable_http_client(url, http_client=http)) as client,
            ):
                me = await call(client, "get_my_entitlements")
            assert me["agent"]["id"] == agent_id
            async with httpx2.AsyncClient() as anonymous:
                refused = await anonymous.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "AGENT_KEY_INVALID"
        finally:
            server.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                await server.wait()


# --- versions and log levels ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["wordclaw", "wordclaw-mcp", "wordclaw-worker"])
async def test_every_command_says_its_version(command: str, tmp_path: Path) -> None:
    code, out, err = await run(command, "--version", env=external_database_env("postgresql://unused/", tmp_path))
    assert (code, out.strip()) == (0, f"{command} {PACKAGE_VERSION}"), err


async def test_the_server_tells_clients_its_version(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        assert client.server_info is not None
        assert (client.server_info.name, client.server_info.version) == ("wordclaw-distribution", PACKAGE_VERSION)


@pytest.mark.parametrize("command", ["wordclaw-mcp", "wordclaw-worker"])
@pytest.mark.parametrize("level", ["verbose", "", "INFO\r\nERROR", "x" * 10_000])
async def test_an_unknown_log_level_is_refused_by_name_without_a_traceback(
    command: str, level: str, tmp_path: Path
) -> None:
    code, _out, err = await run(
        command, "--log-level", level, env=external_database_env("postgresql://unused/", tmp_path)
    )
    assert code == 2, err
    assert "argument --log-level: invalid choice" in err and "DEBUG" in err and "Traceback" not in err


@pytest.mark.parametrize("level", ["debug", "Warning", "ERROR"])
async def test_a_log_level_is_taken_in_any_case(level: str, tmp_path: Path) -> None:
    code, out, err = await run(
        "wordclaw-mcp", "--log-level", level, "--version", env=external_database_env("postgresql://unused/", tmp_path)
    )
    assert code == 0 and out.startswith("wordclaw-mcp "), err


# --- the operator's mistakes are coded errors ----------------------------------------------------------


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``wordclaw …`` in this process on the test database: (exit code, stdout, stderr)."""
    from wordclaw_mcp.cli import main

    monkeypatch.setenv("WORDCLAW_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("WORDCLAW_HOME", str(settings.home))
    monkeypatch.setenv("WORDCLAW_SECRET_KEYS", ",".join(settings.secret_keys))

    async def invoke(*argv: str) -> tuple[int, str, str]:
        code = await anyio.to_thread.run_sync(main, list(argv))
        said = capsys.readouterr()
        return code, said.out, said.err

    return invoke


@pytest.mark.parametrize(
    "channels",
    ["slack", "webhook,slack", "Webhook", "webhook\r\nX-Injected: 1", "rss," + ",".join(f"c{i}" for i in range(5000))],
)
async def test_a_grant_for_a_channel_no_adapter_handles_is_refused_and_nothing_is_stored(
    cli, service: DistributionService, db: asyncpg.Connection, channels: str
) -> None:
    agent, _key = await service.access.create_agent("reseller", ["distribution:write"], "default")
    code, _out, err = await cli(
        "entitlements", "grant", "--agent", str(agent.id), "--all-items", "--channels", channels
    )
    assert code == 2, err
    [line] = err.splitlines()  # one line, whatever the name held
    assert line.startswith("wordclaw: UNSUPPORTED_CHANNEL_TYPE: ") and "webhook" in line, line
    assert await db.fetchval("SELECT count(*) FROM entitlements") == 0


async def test_a_grant_for_installed_channels_is_stored(
    cli, service: DistributionService, db: asyncpg.Connection
) -> None:
    agent, _key = await service.access.create_agent("reseller", ["distribution:write"], "default")
    code, out, err = await cli(
        "entitlements", "grant", "--agent", str(agent.id), "--all-items", "--channels", "webhook,mastodon,email"
    )
    assert code == 0, err
    assert "\temail,mastodon,webhook\t" in out
    assert await db.fetchval("SELECT allowed_channels FROM entitlements") == ["email", "mastodon", "webhook"]


@pytest.mark.parametrize(
    ("option", "code"), [("--plan", "PLAN_NOT_FOUND"), ("--target", "TARGET_NOT_FOUND"), ("--job", "JOB_NOT_FOUND")]
)
async def test_a_redrive_of_an_id_that_does_not_exist_is_a_coded_error(cli, option: str, code: str) -> None:
    missing = uuid.uuid4()
    exit_code, out, err = await cli("jobs", "redrive", option, str(missing))
    assert (exit_code, out) == (2, ""), out + err
    [line] = err.splitlines()
    assert line.startswith(f"wordclaw: {code}: ") and str(missing) in line, line


async def test_a_redrive_of_a_plan_with_nothing_failed_queues_nothing_and_says_so(
    cli, service: DistributionService, receiver: WebhookReceiver
) -> None:
    plan, [target_id] = await publish(service, [receiver.url])
    job_id = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs[0].id
    for option, ident in (("--plan", plan.id), ("--target", target_id), ("--job", job_id)):
        assert await cli("jobs", "redrive", option, str(ident)) == (0, "0 failed job(s) queued again\n", "")


# --- the examples ---------------------------------------------------------------------------------------


def _variables_read_by_the_settings() -> set[str]:
    source = (Path(__file__).parent.parent / "wordclaw_mcp" / "config.py").read_text()
    return set(re.findall(r'"(WORDCLAW_[A-Z_]+)"', source))


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in {".json", ".env"}))
def test_an_example_names_only_settings_that_exist(example: str) -> None:
    text = (EXAMPLES / example).read_text()
    named = set(re.findall(r"\bWORDCLAW_[A-Z_]+\b", text))
    assert named <= _variables_read_by_the_settings(), named - _variables_read_by_the_settings()
    if example.endswith(".json"):
        json.loads(text)


def test_no_example_gives_every_process_an_agent_key() -> None:
    # A key in a shared env file would be every stdio session's agent; each client has its own.
    settings_lines = [
        line for line in (EXAMPLES / "shared_postgres.env").read_text().splitlines() if not line.startswith("#")
    ]
    assert not [line for line in settings_lines if line.startswith("WORDCLAW_AGENT_KEY=")]
    for example in ("claude_desktop_config.json", "cursor_mcp.json", "vscode_mcp.json"):
        servers = json.loads((EXAMPLES / example).read_text()).get("mcpServers") or json.loads(
            (EXAMPLES / example).read_text()
        )["servers"]
        # On the embedded default no key is needed, and a placeholder key would stop the server.
        assert all("WORDCLAW_AGENT_KEY" not in server.get("env", {}) for server in servers.values())
