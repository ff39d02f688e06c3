"""What the benchmarks share: a database of their own for each measurement, a deadline, a stop on
SIGINT or SIGTERM, set-up tool calls that must succeed, and the CPU time of processes."""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import asyncpg
from mcp import Client

from wordclaw_mcp import queries
from wordclaw_mcp.service import each_once


class BenchmarkFailed(RuntimeError):
    """A run that did not end as it must: its figures would be meaningless."""


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """``anyio.fail_after``, reported as a failed benchmark rather than a bare TimeoutError."""
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise BenchmarkFailed(f"{what} did not finish within {seconds:g} s (raise --timeout?)") from None


@asynccontextmanager
async def scratch_database(admin_url: str, prefix: str) -> AsyncIterator[str]:
    """A new, empty database for one measurement; its URL. Dropped however the block ends."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(queries.create_database(name))
        try:
            yield with_database(admin_url, name)
        finally:
            with anyio.CancelScope(shield=True):
                await admin.execute(queries.drop_database(name))
    finally:
        await admin.close()


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) process ``pid`` has used so far; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


async def server_cpu(conn: asyncpg.Connection) -> dict[int, float]:
    """The CPU time so far of every server process on ``conn``'s database (PostgreSQL on this machine)."""
    rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
    return {row["pid"]: cpu_seconds(row["pid"]) for row in rows}


def cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    """The CPU time the processes in ``after`` used since ``before`` (a new process, since it started)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def with_database(url: str, name: str) -> str:
    """``url`` naming the database ``name`` instead, keeping its query (a socket path, say)."""
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{name}" + (f"?{query}" if query else "")


async def until_signalled(measure: Callable[[], Awaitable[None]]) -> None:
    """Run ``measure``; SIGINT or SIGTERM stops it, after its databases are dropped and processes ended."""
    interrupted: list[str] = []
    failures: list[BenchmarkFailed] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, tg.cancel_scope, interrupted)
        # Caught here: out of the task group it would come wrapped in an ExceptionGroup.
        try:
            await measure()
        except BenchmarkFailed as exc:
            failures.append(exc)
        tg.cancel_scope.cancel()
    if interrupted:
        raise BenchmarkFailed(f"interrupted by {interrupted[0]}")
    if failures:
        raise failures[0]


async def _stop_on_signal(scope: anyio.CancelScope, interrupted: list[str]) -> None:
    # Installed explicitly: a shell starts background jobs with SIGINT ignored.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            interrupted.append(signal.Signals(signum).name)
            scope.cancel()
            return


async def setup_call(client: Client, tool: str, *, reply_seconds: float, **arguments: Any) -> dict[str, Any]:
    """A set-up call that must succeed."""
    result = await client.call_tool(tool, arguments, read_timeout_seconds=reply_seconds)
    if result.is_error:
        raise BenchmarkFailed(f"{tool} failed: {result.content[0].text}")
    return result.structured_content or {}


# The local agent's (wordclaw_mcp.access.LOCAL_AGENT), whose tenant every benchmark row is in.
BENCH_AGENT = "00000000-0000-0000-0000-000000000001"
BENCH_TENANT = "default"


def create_plan_arguments(
    item_id: Any,
    version: int,
    target_ids: list[Any],
    payloads: list[Any],
    *,
    channel_type: str,
    max_attempts: int = 8,
    options: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """queries.CREATE_PLAN's arguments for a plan of the local agent's own item, as the service
    passes them: no idempotency key, no grant, and the duplicate rule waived (benchmarks plan the
    same item and target over and over)."""
    count = len(target_ids)
    distinct, picks = each_once(payloads)
    return (
        item_id,
        version,
        BENCH_AGENT,
        options or {},
        max_attempts,
        target_ids,
        distinct,
        0,
        True,
        BENCH_TENANT,
        None,
        None,
        [None] * count,
        [channel_type] * count,
        ["OWNER"] * count,
        picks,
    )
