"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

import anyio
import asyncpg
from mcp import Client
from mcp.types import CallToolResult

from queue_worker.adapters.webhook import new_signing_secret  # noqa: F401 - re-exported for the tests
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import (
    CreateDistributionPlanInput,
    Plan,
    RegisterTargetInput,
    TransformPolicy,
    UpsertContentItemInput,
)
from wordclaw_mcp.service import DistributionService

T = TypeVar("T")


def database_name(url: str) -> str:
    """The database a URL names; the embedded server's URLs carry a socket path in the query."""
    return urlsplit(url).path.lstrip("/")


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must succeed; returns its structured content."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def call_error(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must fail with a coded error; returns {code, message, remediation}.

    The error is JSON text with no structuredContent: that must match the tool's output schema,
    which describes a success (tests/test_inspector.py shows why).
    """
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    assert result.structured_content is None, result.structured_content
    [block] = result.content
    error = json.loads(block.text)["error"]
    assert set(error) >= {"code", "message", "remediation"}
    assert "Traceback" not in block.text
    return error


def answer_of(result: CallToolResult) -> dict[str, Any]:
    """A tool's answer as a dict: a success's structured content, or an error's ``{"error": …}``."""
    if result.is_error:
        return json.loads(result.content[0].text)
    return result.structured_content or {}


async def eventually(check: Callable[[], Awaitable[T]], *, within: float = 10.0, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s (last value {value!r})")
        await anyio.sleep(interval)


async def terminate_backends(server_url: str, database: str) -> int:
    """Kill every session on ``database``, as a restart or an operator would. Returns how many."""
    import asyncpg

    admin = await asyncpg.connect(server_url)
    try:
        return await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 "
            "AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await admin.close()


async def terminate_lock_waiters(server_url: str, database: str) -> int:
    """Wait until a session on ``database`` is blocked on a lock, then kill every such session.

    Killing a connection while its statement runs makes the loss certain: one killed while idle
    may be noticed, and silently replaced, by the pool before anyone uses it.
    """
    import asyncpg

    admin = await asyncpg.connect(server_url)
    try:
        return await eventually(
            lambda: admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                database,
            )
        )
    finally:
        await admin.close()


async def await_plan_around(
    service: DistributionService,
    plan_id: UUID,
    deliver: Callable[[], Awaitable[object]],
    *,
    ready: Callable[[], Awaitable[object]] = anyio.wait_all_tasks_blocked,
) -> Plan:
    """Start ``await_plan``, wait for ``ready``, run ``deliver``; what ``await_plan`` returned."""
    result: dict[str, Plan] = {}

    async def wait() -> None:
        result["plan"] = await service.await_plan(plan_id, 30)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await ready()
            await deliver()
    return result["plan"]


async def publish(
    service: DistributionService,
    urls: list[str],
    *,
    policy: TransformPolicy | None = None,
    secret: str | None = None,
) -> tuple[Plan, list[UUID]]:
    """A content item, one webhook target per URL, and a queued plan."""
    item = await service.upsert_content_item(UpsertContentItemInput(title="Title", body="Some *body* text."))
    target_ids = []
    for index, url in enumerate(urls):
        target = await service.register_target(
            RegisterTargetInput(
                name=f"hook-{index}-{secrets.token_hex(4)}",
                channel_type="webhook",
                config={"url": url},
                secrets={"signingSecret": secret} if secret else None,
            )
        )
        target_ids.append(target.id)
    plan = await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=target_ids, transform_policy=policy)
    )
    return plan, target_ids


async def waiting_for_a_lock(conn: asyncpg.Connection, pid: int) -> bool:
    """Whether the session ``pid`` is blocked on a lock, as seen from ``conn``."""
    return await conn.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid) is True


@asynccontextmanager
async def serving_http(settings: Settings) -> AsyncIterator[str]:
    """wordclaw-mcp over streamable HTTP on 127.0.0.1 (serve_http, as the CLI runs it); its URL."""
    import uvicorn

    from wordclaw_mcp.bearer import serve_http
    from wordclaw_mcp.server import build_server

    servers: list[uvicorn.Server] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: serve_http(build_server(settings), settings, host="127.0.0.1", port=0, ready=servers.append)
        )

        async def started() -> bool:
            return bool(servers) and servers[0].started

        await eventually(started, within=15)
        port = servers[0].servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            servers[0].should_exit = True

