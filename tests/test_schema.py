"""schema.sql: idempotent, versioned, constrained, and the claim is served by its index."""

from __future__ import annotations

import json
import uuid

import anyio
import asyncpg
import pytest

from wordclaw_mcp import queries
from wordclaw_mcp.database import SCHEMA_VERSION, apply_schema, connect
from wordclaw_mcp.errors import SchemaTooNew

pytestmark = pytest.mark.anyio


async def test_schema_applies_idempotently_and_records_its_version(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        assert await apply_schema(conn) == SCHEMA_VERSION
        assert await apply_schema(conn, force=True) == SCHEMA_VERSION  # every statement again
        assert await conn.fetch("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
        tables = {
            row["tablename"] for row in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert tables >= {
            "content_items",
            "distribution_targets",
            "distribution_plans",
            "distribution_jobs",
            "distribution_receipts",
            "distribution_events",
            "schema_version",
        }
    finally:
        await conn.close()


async def test_processes_starting_together_apply_the_schema_once(empty_database_url: str) -> None:
    conns = [await connect(empty_database_url) for _ in range(4)]
    try:
        async with anyio.create_task_group() as tg:
            for conn in conns:
                tg.start_soon(apply_schema, conn)
        assert await conns[0].fetchval("SELECT count(*) FROM schema_version") == 1
    finally:
        for conn in conns:
            await conn.close()


async def test_a_database_newer_than_the_release_is_refused(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        await apply_schema(conn)
        await conn.execute(queries.RECORD_SCHEMA_VERSION, SCHEMA_VERSION + 1)
        with pytest.raises(SchemaTooNew) as raised:
            await apply_schema(conn)
        assert raised.value.code == "SCHEMA_TOO_NEW"
    finally:
        await conn.close()


async def _plan_with_jobs(conn: asyncpg.Connection, count: int) -> uuid.UUID:
    item = await conn.fetchval("INSERT INTO content_items (title, body_markdown) VALUES ('t', 'b') RETURNING id")
    target = await conn.fetchval(
        "INSERT INTO distribution_targets (name, channel_type) VALUES ($1, 'webhook') RETURNING id",
        f"t-{uuid.uuid4().hex[:6]}",
    )
    plan = await conn.fetchval(
        "INSERT INTO distribution_plans (content_item_id, content_version, created_by_agent_id) "
        "VALUES ($1, 1, 'test') RETURNING id",
        item,
    )
    await conn.execute(
        "INSERT INTO distribution_jobs (plan_id, target_id, max_attempts, payload_snapshot) "
        "SELECT $1, $2, 3, '{}'::jsonb FROM generate_series(1, $3)",
        plan,
        target,
        count,
    )
    return plan


@pytest.mark.parametrize(
    ("table", "statement"),
    [
        ("distribution_plans", "UPDATE distribution_plans SET status = 'done'"),
        ("distribution_jobs", "UPDATE distribution_jobs SET status = 'paused'"),
    ],
)
async def test_status_columns_reject_unknown_states(database_url: str, table: str, statement: str) -> None:
    conn = await connect(database_url)
    try:
        await _plan_with_jobs(conn, 1)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_a_running_job_must_hold_a_lease(database_url: str) -> None:
    conn = await connect(database_url)
    try:
        await _plan_with_jobs(conn, 1)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE distribution_jobs SET status = 'running'")
    finally:
        await conn.close()


async def test_the_claim_query_is_served_by_the_claim_index(database_url: str) -> None:
    conn = await connect(database_url)
    try:
        plan = await _plan_with_jobs(conn, 5000)
        # Most jobs finished, as in a long-running deployment: the partial index holds only the queued.
        await conn.execute(
            "UPDATE distribution_jobs SET status = 'succeeded' WHERE plan_id = $1 "
            "AND id NOT IN (SELECT id FROM distribution_jobs ORDER BY id LIMIT 50)",
            plan,
        )
        await conn.execute("ANALYZE distribution_jobs")
        plan_json = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {queries.CLAIM_JOBS}", 10, 60.0, "explain")
        text = json.dumps(plan_json)
        assert "distribution_jobs_claim" in text, text
        assert '"Relation Name": "distribution_jobs", "Alias": "j", "Node Type": "Seq Scan"' not in text
    finally:
        await conn.close()


async def test_pooled_connections_plan_every_statement_for_its_real_parameters(database_url: str) -> None:
    """A cached generic plan assumes unnest() yields 10 rows and made batch writes quadratic."""
    from wordclaw_mcp.database import create_pool

    pool = await create_pool(database_url, max_size=1)
    try:
        assert await pool.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    finally:
        await pool.close()
