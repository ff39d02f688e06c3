"""Retention: finished jobs, their receipts, emptied plans and events go once old enough, in
batches that skip what others hold, and never anything of a plan that is still going."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from uuid import UUID

import anyio
import asyncpg
import pytest
from cryptography.fernet import Fernet

from queue_worker.worker import Worker
from tests.helpers import eventually, publish
from tests.test_worker import running
from wordclaw_mcp import queries
from wordclaw_mcp.cli import main
from wordclaw_mcp.config import Settings
from wordclaw_mcp.database import connect, create_pool_for
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.retention import PruneReport, prune
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

RETENTION_VARIABLES = (
    "WORDCLAW_RETAIN_SUCCEEDED_DAYS",
    "WORDCLAW_RETAIN_FAILED_DAYS",
    "WORDCLAW_RETAIN_EVENTS_DAYS",
    "WORDCLAW_RETAIN_DECISIONS_DAYS",
)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    assert settings.database_url
    opened = await create_pool_for(settings, settings.database_url)
    yield opened
    await opened.close()


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    opened = await connect(database_url)
    yield opened
    await opened.close()


async def make_plan(conn: asyncpg.Connection, *jobs: tuple[str, float | None]) -> tuple[UUID, list[UUID]]:
    """A plan with one job per (status, days since it finished); the triggers set the plan's status."""
    item = await conn.fetchval(
        "INSERT INTO content_items (title, body_markdown, tenant_id, created_by_agent_id) "
        "VALUES ('t', 'b', 'default', '00000000-0000-0000-0000-000000000001') RETURNING id"
    )
    target = await conn.fetchval(
        "INSERT INTO distribution_targets (name, channel_type, tenant_id) VALUES ($1, 'webhook', 'default') "
        "RETURNING id",
        f"hook-{uuid.uuid4().hex[:8]}",
    )
    plan = await conn.fetchval(
        "INSERT INTO distribution_plans (content_item_id, content_version, created_by_agent_id, tenant_id) "
        "VALUES ($1, 1, '00000000-0000-0000-0000-000000000001', 'default') RETURNING id",
        item,
    )
    job_ids = [
        await conn.fetchval(
            "INSERT INTO distribution_jobs (plan_id, target_id, position, max_attempts, payload_snapshot) "
            "VALUES ($1, $2, $3, 3, '{}') RETURNING id",
            plan,
            target,
            position,
        )
        for position in range(len(jobs))
    ]
    await set_jobs(conn, job_ids, [status for status, _ in jobs], [days for _, days in jobs])
    return plan, job_ids


async def set_jobs(
    conn: asyncpg.Connection, job_ids: list[UUID], statuses: list[str], days_ago: list[float | None]
) -> None:
    """Moves jobs in one statement, as a worker's batch would; a finished one ended ``days_ago``."""
    await conn.execute(
        """
        UPDATE distribution_jobs j
        SET status = s.status,
            attempt = 1,
            lease_expires_at = CASE WHEN s.status = 'running' THEN now() + interval '1 hour' END,
            finished_at = CASE WHEN s.status IN ('succeeded', 'failed', 'cancelled')
                               THEN now() - make_interval(secs => coalesce(s.days, 0) * 86400) END
        FROM unnest($1::uuid[], $2::text[], $3::float8[]) AS s (id, status, days)
        WHERE j.id = s.id
        """,
        job_ids,
        statuses,
        days_ago,
    )


async def add_receipts(conn: asyncpg.Connection, job_id: UUID, count: int) -> None:
    await conn.execute(
        "INSERT INTO distribution_receipts (job_id, attempt, succeeded) "
        "SELECT $1, n, false FROM generate_series(1, $2) n",
        job_id,
        count,
    )


async def age_events(conn: asyncpg.Connection, plan_id: UUID, days: float) -> int:
    """Makes every event of a plan ``days`` old; returns how many there are."""
    return await conn.fetchval(
        "WITH aged AS (UPDATE distribution_events SET created_at = now() - make_interval(secs => $2 * 86400) "
        "WHERE plan_id = $1 RETURNING 1) SELECT count(*) FROM aged",
        plan_id,
        days,
    )


async def add_events(conn: asyncpg.Connection, plan_id: UUID, days: float, count: int = 1) -> list[int]:
    rows = await conn.fetch(
        "INSERT INTO distribution_events (event_type, plan_id, payload, created_at) "
        "SELECT 'test.event', $1, '{}', now() - make_interval(secs => $2 * 86400) FROM generate_series(1, $3) "
        "RETURNING id",
        plan_id,
        days,
        count,
    )
    return [row["id"] for row in rows]


async def existing(conn: asyncpg.Connection, table: str, ids: list[UUID] | list[int]) -> set[object]:
    return {row["id"] for row in await conn.fetch(f"SELECT id FROM {table} WHERE id = ANY($1)", ids)}


async def job_statuses(conn: asyncpg.Connection) -> dict[UUID, str]:
    return {row["id"]: row["status"] for row in await conn.fetch("SELECT id, status FROM distribution_jobs")}


# --- what goes, and when ----------------------------------------------------------------------


async def test_finished_jobs_go_at_the_age_of_their_status_and_younger_ones_stay(
    pool: asyncpg.Pool, conn: asyncpg.Connection, settings: Settings
) -> None:
    assert (settings.retain_succeeded_days, settings.retain_failed_days) == (14, 30)
    old, young = {}, {}
    for status, old_days, young_days in [("succeeded", 15, 13), ("cancelled", 15, 13), ("failed", 31, 29)]:
        old[status] = await make_plan(conn, (status, old_days))
        young[status] = await make_plan(conn, (status, young_days))

    report = await prune(pool, settings)

    assert (report.succeeded_jobs, report.cancelled_jobs, report.failed_jobs, report.plans) == (1, 1, 1, 3)
    assert set(await job_statuses(conn)) == {jobs[0] for _, jobs in young.values()}
    assert await existing(conn, "distribution_plans", [plan for plan, _ in [*old.values(), *young.values()]]) == {
        plan for plan, _ in young.values()
    }
    assert (await prune(pool, settings)).jobs == 0  # nothing more is old enough


async def test_the_ages_come_from_the_settings_and_0_keeps_a_kind_for_ever(
    pool: asyncpg.Pool, conn: asyncpg.Connection, settings: Settings
) -> None:
    settings = replace(settings, retain_succeeded_days=2, retain_failed_days=0, retain_events_days=-1)
    succeeded_plan, _ = await make_plan(conn, ("succeeded", 3))
    cancelled_plan, _ = await make_plan(conn, ("cancelled", 3))
    kept_plan, (kept,) = await make_plan(conn, ("succeeded", 1))
    failed_plan, (failed,) = await make_plan(conn, ("failed", 1000))
    events = await add_events(conn, failed_plan, 1000, count=3)

    report = await prune(pool, settings)

    assert (report.succeeded_jobs, report.cancelled_jobs, report.failed_jobs, report.events) == (1, 1, 0, 0)
    assert set(await job_statuses(conn)) == {kept, failed}
    assert await existing(conn, "distribution_plans", [succeeded_plan, cancelled_plan, kept_plan, failed_plan]) == {
        kept_plan,
        failed_plan,
    }
    assert await existing(conn, "distribution_events", events) == set(events)


async def test_a_plan_goes_with_its_last_job_and_not_before(
    pool: asyncpg.Pool, conn: asyncpg.Connection, settings: Settings
) -> None:
    plan, (_, failed) = await make_plan(conn, ("succeeded", 15), ("failed", 20))
    assert await conn.fetchval("SELECT status FROM distribution_plans WHERE id = $1", plan) == "partial"

    report = await prune(pool, settings)
    assert (report.succeeded_jobs, report.failed_jobs, report.plans) == (1, 0, 0)
    assert set(await job_statuses(conn)) == {failed}
    assert await existing(conn, "distribution_plans", [plan]) == {plan}

    await conn.execute("UPDATE distribution_jobs SET finished_at = now() - interval '31 days' WHERE id = $1", failed)
    report = await prune(pool, settings)
    assert (report.failed_jobs, report.plans) == (1, 1)
    assert await job_statuses(conn) == {}
    assert await existing(conn, "distribution_plans", [plan]) == set()


@pytest.mark.parametrize("open_status", ["queued", "running"])
async def test_nothing_of_a_plan_with_a_queued_or_running_job_is_deleted(
    pool: asyncpg.Pool, conn: asyncpg.Connection, settings: Settings, open_status: str
) -> None:
    plan, jobs = await make_plan(conn, ("succeeded", 20), ("cancelled", 20), ("failed", 40), (open_status, None))
    *finished, open_job = jobs
    assert await conn.fetchval("SELECT status FROM distribution_plans WHERE id = $1", plan) == "running"
    for job in finished:
        await add_receipts(conn, job, 2)
    events = await age_events(conn, plan, 40)
    assert events > 0

    report = await prune(pool, settings)

    assert report == PruneReport(batches=report.batches, largest_batch=0)
    assert set(await job_statuses(conn)) == set(jobs)
    assert await conn.fetchval("SELECT count(*) FROM distribution_receipts") == 6
    assert await conn.fetchval("SELECT count(*) FROM distribution_events WHERE plan_id = $1", plan) == events
    assert await existing(conn, "distribution_plans", [plan]) == {plan}

    # Once its last job ends, the plan is final: what is old goes, the job that just ended stays.
    await set_jobs(conn, [open_job], ["succeeded"], [0])
    report = await prune(pool, settings)
    assert (report.succeeded_jobs, report.cancelled_jobs, report.failed_jobs, report.receipts) == (1, 1, 1, 6)
    assert report.events == events
    assert await job_statuses(conn) == {open_job: "succeeded"}
    assert await existing(conn, "distribution_plans", [plan]) == {plan}


async def test_receipts_go_with_their_jobs(pool: asyncpg.Pool, conn: asyncpg.Connection, settings: Settings) -> None:
    _, (old,) = await make_plan(conn, ("failed", 31))
    _, (young,) = await make_plan(conn, ("failed", 29))
    await add_receipts(conn, old, 3)
    await add_receipts(conn, young, 2)

    report = await prune(pool, settings)

    assert (report.failed_jobs, report.receipts) == (1, 3)
    assert [row["job_id"] for row in await conn.fetch("SELECT job_id FROM distribution_receipts")] == [young, young]


async def test_events_go_at_their_own_age(pool: asyncpg.Pool, conn: asyncpg.Connection, settings: Settings) -> None:
    settings = replace(settings, retain_events_days=3)
    plan, (job,) = await make_plan(conn, ("succeeded", 1))  # final, but its job is young: it stays
    gone_plan = uuid.uuid4()  # a plan retention already deleted: its events outlive it
    old = await add_events(conn, plan, 4) + await add_events(conn, gone_plan, 4, count=2)
    young = await add_events(conn, plan, 2) + await add_events(conn, gone_plan, 2)

    report = await prune(pool, settings)

    assert (report.events, report.jobs) == (3, 0)
    assert await existing(conn, "distribution_events", old + young) == set(young)
    assert set(await job_statuses(conn)) == {job}


async def test_entitlement_decisions_go_at_their_own_age(
    pool: asyncpg.Pool, conn: asyncpg.Connection, settings: Settings
) -> None:
    settings = replace(settings, retain_decisions_days=30)
    insert = (
        "INSERT INTO entitlement_decisions (tenant_id, agent_id, content_item_id, target_id, channel_type, stage, "
        "outcome, code, created_at) SELECT 'default', gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), "
        "'webhook', 'plan', 'allow', 'OWNER', now() - make_interval(days => $1) FROM generate_series(1, $2) "
        "RETURNING id"
    )
    old = [row["id"] for row in await conn.fetch(insert, 31, 3)]
    young = [row["id"] for row in await conn.fetch(insert, 29, 2)]

    report = await prune(pool, settings, batch_size=2)

    assert report.decisions == 3
    assert await existing(conn, "entitlement_decisions", old + young) == set(young)
    assert (await prune(pool, replace(settings, retain_decisions_days=0))).decisions == 0  # 0: for ever


# --- batches and locks ------------------------------------------------------------------------


async def test_each_statement_deletes_at_most_a_batch_and_pruning_goes_on_until_a_short_one(
    pool: asyncpg.Pool, conn: asyncpg.Connection, settings: Settings
) -> None:
    plan, jobs = await make_plan(conn, *[("succeeded", 15)] * 5)
    for job in jobs:
        await add_receipts(conn, job, 1)
    await conn.execute("DELETE FROM distribution_events")
    await add_events(conn, plan, 15, count=5)

    report = await prune(pool, settings, batch_size=2)

    assert (report.succeeded_jobs, report.receipts, report.plans, report.events) == (5, 5, 1, 5)
    assert report.largest_batch == 2
    # Succeeded jobs 2 + 2 + 1, none cancelled, none failed, events 2 + 2 + 1.
    assert report.batches == 3 + 1 + 1 + 3 + 1  # the last: no decision to prune
    for table in ("distribution_jobs", "distribution_receipts", "distribution_plans", "distribution_events"):
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table


async def test_a_batch_skips_rows_another_transaction_holds_instead_of_waiting(
    pool: asyncpg.Pool, conn: asyncpg.Connection, settings: Settings, database_url: str
) -> None:
    held_plan, (held_job, _) = await make_plan(conn, ("succeeded", 20), ("succeeded", 20))
    # A worker recording an attempt holds the plan's row while the job trigger recomputes it.
    busy_plan, (busy_job,) = await make_plan(conn, ("failed", 40))
    free_plan, _ = await make_plan(conn, ("cancelled", 20))
    await conn.execute("DELETE FROM distribution_events")
    held_event, free_event = await add_events(conn, free_plan, 20, count=2)

    holder = await connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM distribution_jobs WHERE id = $1 FOR UPDATE", held_job)
            await holder.execute("SELECT 1 FROM distribution_plans WHERE id = $1 FOR UPDATE", busy_plan)
            await holder.execute("SELECT 1 FROM distribution_events WHERE id = $1 FOR UPDATE", held_event)
            with anyio.fail_after(5):  # the pool would wait 10 s (lock_timeout) on a held row
                report = await prune(pool, settings)
            assert (report.succeeded_jobs, report.cancelled_jobs, report.failed_jobs) == (1, 1, 0)
            assert (report.plans, report.events) == (1, 1)
            assert set(await job_statuses(conn)) == {held_job, busy_job}
            assert await existing(conn, "distribution_plans", [held_plan, busy_plan, free_plan]) == {
                held_plan,
                busy_plan,
            }
            assert await existing(conn, "distribution_events", [held_event, free_event]) == {held_event}
    finally:
        await holder.close()

    report = await prune(pool, settings)  # released: the rest goes now
    assert (report.succeeded_jobs, report.failed_jobs, report.plans, report.events) == (1, 1, 2, 1)
    assert await job_statuses(conn) == {}


async def test_the_pruning_statements_walk_indexes_not_tables(conn: asyncpg.Connection) -> None:
    await conn.execute("SET enable_seqscan = off")  # a table scan is then only chosen when nothing else serves

    async def plan_of(sql: str, *args: object) -> str:
        return "\n".join(row[0] for row in await conn.fetch("EXPLAIN " + sql, *args))

    jobs = await plan_of(queries.PRUNE_FINISHED_JOBS, "succeeded", 86400.0, 1000)
    assert "distribution_jobs_finished" in jobs, jobs
    events = await plan_of(queries.PRUNE_EVENTS, 86400.0, 1000)
    assert "distribution_events_created" in events, events
    decisions = await plan_of(queries.PRUNE_DECISIONS, 86400.0, 1000)
    assert "entitlement_decisions_created" in decisions, decisions
    plans = await plan_of(queries.PRUNE_EMPTIED_PLANS, [uuid.uuid4()])
    for plan in (jobs, events, decisions, plans):
        assert "Seq Scan" not in plan, plan


# --- settings ---------------------------------------------------------------------------------


def test_retention_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in RETENTION_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    defaults = Settings.from_env()
    assert (defaults.retain_succeeded_days, defaults.retain_failed_days, defaults.retain_events_days) == (14, 30, 14)
    assert defaults.retain_decisions_days == 365
    assert defaults.retention_interval == 3600

    for variable, value in zip(RETENTION_VARIABLES, ["7", "90.5", "0", "730"], strict=True):
        monkeypatch.setenv(variable, value)
    configured = Settings.from_env()
    assert (configured.retain_succeeded_days, configured.retain_failed_days, configured.retain_events_days) == (
        7,
        90.5,
        0,
    )
    assert configured.retain_decisions_days == 730
    monkeypatch.setenv("WORDCLAW_RETAIN_FAILED_DAYS", "-1")  # less than 0 disables too
    assert Settings.from_env().retain_failed_days == -1


@pytest.mark.parametrize("variable", RETENTION_VARIABLES)
@pytest.mark.parametrize("value", ["a fortnight", "nan", "inf", "36501"])
def test_retention_ages_that_are_not_a_number_of_days_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(DistributionError) as raised:
        Settings.from_env()
    assert raised.value.code == "INVALID_SETTINGS"
    assert variable in raised.value.message + raised.value.remediation


@pytest.mark.parametrize("interval", [0, -5, math.inf, math.nan])
def test_a_retention_interval_that_is_not_a_positive_number_of_seconds_is_refused(interval: float) -> None:
    with pytest.raises(DistributionError) as raised:
        Settings(retention_interval=interval)
    assert raised.value.code == "INVALID_SETTINGS"
    assert "retention interval" in raised.value.message


async def test_prune_refuses_a_batch_size_below_1(pool: asyncpg.Pool, settings: Settings) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        await prune(pool, settings, batch_size=0)


# --- the operator command ---------------------------------------------------------------------


@pytest.fixture
def command_environment(monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path) -> None:
    for variable in RETENTION_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WORDCLAW_DATABASE_URL", database_url)
    monkeypatch.setenv("WORDCLAW_SECRET_KEYS", Fernet.generate_key().decode())
    monkeypatch.setenv("WORDCLAW_HOME", str(tmp_path / "home"))


@pytest.mark.usefixtures("command_environment")
async def test_wordclaw_retention_prune_prunes_and_prints_the_counts(
    conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    old_plan, _ = await make_plan(conn, ("succeeded", 15))
    old_failed_plan, (old_failed,) = await make_plan(conn, ("failed", 31))
    _, (young,) = await make_plan(conn, ("failed", 29))
    await add_receipts(conn, old_failed, 2)

    # main() runs its own event loop, as it does from the console script.
    code = await anyio.to_thread.run_sync(main, ["retention", "prune", "--batch-size", "1"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    # Succeeded 1 + 0, cancelled 0, failed 1 + 0, events 0 (all are young).
    assert captured.out == (
        "pruned 1 succeeded, 0 cancelled and 1 failed job(s) with 2 receipt(s), 2 plan(s), 0 event(s) and "
        "0 entitlement decision(s) "
        "in 7 batch(es)\n"
    )
    assert set(await job_statuses(conn)) == {young}
    assert await existing(conn, "distribution_plans", [old_plan, old_failed_plan]) == set()


@pytest.mark.usefixtures("command_environment")
async def test_wordclaw_retention_prune_reports_bad_settings_in_one_line(
    conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, (old,) = await make_plan(conn, ("succeeded", 15))
    monkeypatch.setenv("WORDCLAW_RETAIN_FAILED_DAYS", "inf")

    code = await anyio.to_thread.run_sync(main, ["retention", "prune"])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith("wordclaw: INVALID_SETTINGS: WORDCLAW_RETAIN_FAILED_DAYS")
    assert len(captured.err.splitlines()) == 1
    assert set(await job_statuses(conn)) == {old}  # nothing was pruned


async def test_a_running_worker_prunes_old_rows_by_itself(
    runtime: Runtime, service: DistributionService, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    plan, _ = await publish(service, [receiver.url])
    await db.execute(
        "UPDATE distribution_jobs SET status = 'succeeded', finished_at = now() - interval '15 days' "
        "WHERE plan_id = $1",
        plan.id,
    )
    worker = Worker(replace(runtime, settings=replace(runtime.settings, retention_interval=0.2)))
    async with running(worker):
        await eventually(lambda: _gone(db, plan.id))


async def _gone(db: asyncpg.Connection, plan_id: UUID) -> bool:
    return await db.fetchval("SELECT count(*) FROM distribution_plans WHERE id = $1", plan_id) == 0
