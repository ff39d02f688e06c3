"""A plan's status is kept from counters of its jobs in each state, which the job trigger adds
to. It must equal the reference, wordclaw_plan_status over the plan's jobs: after random
sequences of transitions and inserts, and when transactions finish one plan's last jobs at
the same time. Real PostgreSQL."""

from __future__ import annotations

import random
from uuid import UUID

import anyio
import asyncpg
import pytest

from tests.helpers import eventually, waiting_for_a_lock
from wordclaw_mcp.database import connect

pytestmark = pytest.mark.anyio

# (status, attempt): every state a job can be in, with "queued, never attempted" apart.
STATES = [("queued", 0), ("queued", 2), ("running", 1), ("succeeded", 1), ("failed", 3), ("cancelled", 0)]

# What the counters say against what the jobs say, for every plan that disagrees.
DISAGREEMENTS = """
SELECT p.id, p.status, wordclaw_plan_status(p.id) AS reference,
       (p.queued_jobs, p.unattempted_jobs, p.running_jobs, p.succeeded_jobs, p.failed_jobs, p.cancelled_jobs)::text
           AS counters,
       (n.queued, n.unattempted, n.running, n.succeeded, n.failed, n.cancelled)::text AS counted
FROM distribution_plans p
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status = 'queued' AND attempt = 0) AS unattempted,
           count(*) FILTER (WHERE status = 'running') AS running,
           count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled
    FROM distribution_jobs j WHERE j.plan_id = p.id
) n
WHERE p.status IS DISTINCT FROM wordclaw_plan_status(p.id)
   OR (p.queued_jobs, p.unattempted_jobs, p.running_jobs, p.succeeded_jobs, p.failed_jobs, p.cancelled_jobs)
      IS DISTINCT FROM (n.queued, n.unattempted, n.running, n.succeeded, n.failed, n.cancelled)
"""


async def make_plans(conn: asyncpg.Connection, sizes: list[int]) -> dict[UUID, list[UUID]]:
    """Plans with ``sizes`` queued jobs each, one statement per plan as the service does: plan id -> job ids."""
    item = await conn.fetchval(
        "INSERT INTO content_items (title, body_markdown, tenant_id, created_by_agent_id) "
        "VALUES ('t', 'b', 'default', '00000000-0000-0000-0000-000000000001') RETURNING id"
    )
    target = await conn.fetchval(
        "INSERT INTO distribution_targets (name, channel_type, tenant_id) "
        "VALUES ('rollup', 'webhook', 'default') RETURNING id"
    )
    plans = {}
    for size in sizes:
        plan = await conn.fetchval(
            "INSERT INTO distribution_plans (content_item_id, content_version, created_by_agent_id, tenant_id) "
            "VALUES ($1, 1, '00000000-0000-0000-0000-000000000001', 'default') RETURNING id",
            item,
        )
        plans[plan] = await add_jobs(conn, plan, target, size)
    return plans


async def add_jobs(conn: asyncpg.Connection, plan: UUID, target: UUID, count: int) -> list[UUID]:
    rows = await conn.fetch(
        "INSERT INTO distribution_jobs (plan_id, target_id, max_attempts, payload_snapshot) "
        "SELECT $1, $2, 8, '{}'::jsonb FROM generate_series(1, $3) RETURNING id",
        plan,
        target,
        count,
    )
    return [row["id"] for row in rows]


async def move(conn: asyncpg.Connection, moves: dict[UUID, tuple[str, int]]) -> None:
    """Put each job in its state, all in one statement (one trigger firing)."""
    await conn.execute(
        "UPDATE distribution_jobs j SET status = m.status, attempt = m.attempt, "
        "lease_expires_at = CASE WHEN m.status = 'running' THEN now() + interval '1 minute' END, "
        "locked_by = CASE WHEN m.status = 'running' THEN 'test' END "
        "FROM unnest($1::uuid[], $2::text[], $3::int[]) AS m (id, status, attempt) WHERE j.id = m.id",
        list(moves),
        [status for status, _ in moves.values()],
        [attempt for _, attempt in moves.values()],
    )


async def assert_rollup_matches(conn: asyncpg.Connection, when: str) -> None:
    disagreements = [dict(row) for row in await conn.fetch(DISAGREEMENTS)]
    assert not disagreements, f"{when}: {disagreements}"


@pytest.mark.parametrize("seed", range(4))
async def test_random_transitions_keep_every_plan_status_equal_to_the_reference(seed: int, database_url: str) -> None:
    rng = random.Random(seed)
    conn = await connect(database_url)
    try:
        plans = await make_plans(conn, [rng.randint(1, 5) for _ in range(25)])
        target = await conn.fetchval("SELECT id FROM distribution_targets")
        await assert_rollup_matches(conn, "after the plans were created")
        seen: set[str] = set()
        for step in range(150):
            if rng.random() < 0.1:
                plan = rng.choice(list(plans))
                plans[plan] += await add_jobs(conn, plan, target, rng.randint(1, 2))
            else:
                jobs = rng.sample([job for ids in plans.values() for job in ids], rng.randint(1, 8))
                await move(conn, {job: rng.choice(STATES) for job in jobs})
            await assert_rollup_matches(conn, f"seed {seed}, step {step}")
            seen |= {row["status"] for row in await conn.fetch("SELECT DISTINCT status FROM distribution_plans")}
    finally:
        await conn.close()
    # The sequences reached every plan status, so each rule of the derivation was exercised.
    assert seen == {"queued", "running", "succeeded", "partial", "failed", "cancelled"}


@pytest.mark.parametrize(
    ("first", "second", "final"), [("succeeded", "succeeded", "succeeded"), ("failed", "succeeded", "partial")]
)
async def test_two_transactions_finishing_a_plans_last_jobs_at_once_end_it(
    first: str, second: str, final: str, database_url: str
) -> None:
    setup, one, other = [await connect(database_url) for _ in range(3)]
    try:
        plans = await make_plans(setup, [2])
        [(plan, [job_a, job_b])] = plans.items()
        await move(setup, {job_a: ("running", 1), job_b: ("running", 1)})
        other_pid = other.get_server_pid()
        async with anyio.create_task_group() as tg:
            async with one.transaction():
                await move(one, {job_a: (first, 1)})
                # The second finish starts while the first is uncommitted: it must wait for the
                # plan's row, then count on top of the first.
                tg.start_soon(move, other, {job_b: (second, 1)})
                await eventually(lambda: waiting_for_a_lock(setup, other_pid), within=10)
        row = await setup.fetchrow("SELECT status, completed_at FROM distribution_plans WHERE id = $1", plan)
        assert row["status"] == final and row["completed_at"] is not None
        await assert_rollup_matches(setup, "after both finishes")
    finally:
        for conn in (setup, one, other):
            await conn.close()


async def test_concurrent_batches_over_shared_plans_keep_every_plan_status_equal_to_the_reference(
    database_url: str,
) -> None:
    setup = await connect(database_url)
    workers = [await connect(database_url) for _ in range(4)]
    try:
        plans = await make_plans(setup, [8] * 12)
        # Each connection owns two jobs of every plan, so they contend for the plans, not the jobs.
        owned = [[job for ids in plans.values() for job in ids[2 * n : 2 * n + 2]] for n in range(len(workers))]

        async def churn(conn: asyncpg.Connection, jobs: list[UUID], seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(40):
                await move(conn, {job: rng.choice(STATES) for job in rng.sample(jobs, rng.randint(1, 6))})

        async with anyio.create_task_group() as tg:
            for n, conn in enumerate(workers):
                tg.start_soon(churn, conn, owned[n], n)
        await assert_rollup_matches(setup, "after the concurrent batches")
    finally:
        for conn in (setup, *workers):
            await conn.close()
