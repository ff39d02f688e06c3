"""What a plan's acceptance costs in the database, statement by statement, against the floor's reads.

    .venv/bin/python bench/plan_statements.py [--calls N] [--database-url URL]

``create_distribution_plan`` runs two statements: it reads the content item and the targets in
one (GET_PLAN_INPUTS), then creates the plan and its jobs with one statement (CREATE_PLAN, with
its triggers and a durable commit); without allowDuplicate, inside a transaction that first
takes the duplicate rule's locks (timed as BEGIN+LOCK+COMMIT). The floor of
bench/plan_acceptance.py, ``get_receipts``, runs two reads (GET_PLAN_STATUS, GET_PLAN_RECEIPTS).
Each is timed here on its own, one call after another on one pooled connection, for a plan of 5
webhook targets, with ``SELECT 1`` as the round trip with no work in it. The sum for each tool is
the least time a call of it can take before any MCP or Python work. Needs a PostgreSQL server it
may create databases on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from cryptography.fernet import Fernet
from scratch import BENCH_AGENT, BENCH_TENANT, create_plan_arguments, scratch_database  # bench/scratch.py

from wordclaw_mcp import queries
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import ContentItem, TransformPolicy
from wordclaw_mcp.runtime import Runtime

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGETS = 5
WARMUP = 50  # untimed calls first: prepared statements, caches


async def time_calls(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    """Microseconds per call."""
    for _ in range(WARMUP):
        await call()
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.perf_counter() - started) / calls * 1e6


async def run(args: argparse.Namespace) -> None:
    async with scratch_database(args.database_url, "plan_statements") as url:
        with tempfile.TemporaryDirectory(prefix="wordclaw-plan-statements-") as home:
            settings = Settings(
                database_url=url,
                home=Path(home),
                secret_keys=(Fernet.generate_key().decode(),),
                allow_private_targets=True,
                run_worker=False,
            )
            async with Runtime.open(settings) as runtime, runtime.pool.acquire() as conn:
                item = await conn.fetchrow(
                    queries.INSERT_CONTENT_ITEM, "Plans", "A *body*.", None, None, {}, BENCH_TENANT, BENCH_AGENT
                )
                config = {"url": "http://127.0.0.1:9/"}
                targets = [
                    (
                        await conn.fetchrow(
                            queries.INSERT_TARGET,
                            uuid.uuid4(),
                            f"t{i}",
                            "webhook",
                            config,
                            None,
                            None,
                            None,
                            None,
                            BENCH_TENANT,
                            None,
                            False,
                        )
                    )["id"]
                    for i in range(TARGETS)
                ]
                content = ContentItem.model_validate(dict(item))
                payload = runtime.adapters.get("webhook").transform(content, TransformPolicy())
                plan_arguments = create_plan_arguments(
                    item["id"], 1, targets, [payload] * TARGETS, channel_type="webhook"
                )
                plan = await conn.fetchrow(queries.CREATE_PLAN, *plan_arguments)
                timed = {
                    "SELECT 1": lambda: conn.fetchval("SELECT 1"),
                    "GET_PLAN_INPUTS": lambda: conn.fetchrow(
                        queries.GET_PLAN_INPUTS, item["id"], targets, BENCH_TENANT
                    ),
                    "CREATE_PLAN": lambda: conn.fetchrow(queries.CREATE_PLAN, *plan_arguments),
                    # What the duplicate rule adds to a plan without allowDuplicate: a transaction
                    # around CREATE_PLAN, and the rule's locks.
                    "BEGIN+LOCK+COMMIT": lambda: locked(conn, item["id"], targets),
                    "GET_PLAN_STATUS": lambda: conn.fetchval(queries.GET_PLAN_STATUS, plan["id"], BENCH_TENANT),
                    "GET_PLAN_RECEIPTS": lambda: conn.fetch(queries.GET_PLAN_RECEIPTS, plan["id"]),
                }
                figures = {name: await time_calls(call, args.calls) for name, call in timed.items()}
    for name, figure in figures.items():
        print(f"{name:<20} {figure:>8,.0f} µs")
    create = figures["GET_PLAN_INPUTS"] + figures["CREATE_PLAN"]
    floor = figures["GET_PLAN_STATUS"] + figures["GET_PLAN_RECEIPTS"]
    print(f"create_distribution_plan's statements: {create:,.0f} µs; get_receipts's: {floor:,.0f} µs")
    print(
        f"without allowDuplicate, the duplicate rule's transaction and locks add {figures['BEGIN+LOCK+COMMIT']:,.0f} µs"
    )


async def locked(conn: asyncpg.Connection, item_id: object, targets: list[object]) -> None:
    async with conn.transaction():
        await conn.fetchval(queries.LOCK_PLAN_KEYS, BENCH_TENANT, item_id, targets, BENCH_AGENT, None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per statement (default 2000)")
    parser.add_argument("--database-url", default=DEFAULT_URL, help=f"an admin URL (default {DEFAULT_URL})")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    anyio.run(run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
