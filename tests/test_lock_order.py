"""Locks are taken in one order everywhere (targets, then jobs in id order, then plans in id order),
so the hot statements run side by side without a deadlock: claims, outcome writes (with throttles
and 410s), heartbeats, rescues, cancels, deactivations, redrives, retention and new plans, all at
once on the same few targets and plans, with PostgreSQL looking for deadlocks every 10 ms."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

import anyio
import asyncpg
import pytest

from queue_worker.worker import Outcome, Worker
from tests.helpers import database_name
from wordclaw_mcp import retention
from wordclaw_mcp.adapters import DeliveryResult
from wordclaw_mcp.config import Settings
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import (
    CreateDistributionPlanInput,
    PlanRef,
    RegisterTargetInput,
    UpsertContentItemInput,
)
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

TARGETS = 4
ROUNDS = 80  # iterations of each actor; every one touches rows the others touch


def outcome_for(job, rng: random.Random) -> Outcome:
    roll = rng.random()
    if roll < 0.45:
        result = DeliveryResult(succeeded=True, status_code=200)
    elif roll < 0.7:
        result = DeliveryResult(succeeded=False, retryable=True, error="try again", refused=True)
    elif roll < 0.85:
        until = datetime.now(UTC) + timedelta(milliseconds=50)
        result = DeliveryResult(succeeded=False, retryable=True, throttled=True, throttled_until=until, refused=True)
    elif roll < 0.9:
        result = DeliveryResult(succeeded=False, status_code=410, target_gone=True, refused=True)
    else:
        return Outcome.release(job, "not started", 0.0)
    return Outcome.of(job, result, delay=0.0)


async def test_the_hot_statements_run_side_by_side_without_a_deadlock(database_url: str, settings: Settings) -> None:
    admin = await asyncpg.connect(database_url)
    try:
        # Every session of this database looks for deadlocks after 10 ms of waiting, not a second.
        await admin.execute(f'ALTER DATABASE "{database_name(database_url)}" SET deadlock_timeout = \'10ms\'')
    finally:
        await admin.close()
    quick = replace(
        settings,
        lease_seconds=0.4,
        delivery_timeout=0.2,
        worker_batch_size=20,
        retain_succeeded_days=1e-9,
        retain_failed_days=1e-9,
        retain_events_days=1e-9,
    )
    failures: list[BaseException] = []
    counts: dict[str, int] = {}
    async with Runtime.open(quick) as runtime:
        service = DistributionService(runtime)
        # Half the targets have limits, so that claims lock and update them too.
        targets = [
            (
                await service.register_target(
                    RegisterTargetInput(
                        name=f"t{n}",
                        channel_type="webhook",
                        config={"url": f"http://127.0.0.1:9/{n}"},
                        max_concurrency=50 if n % 2 else None,
                        rate_per_minute=60_000 if n % 2 else None,
                    )
                )
            ).id
            for n in range(TARGETS)
        ]
        item = await service.upsert_content_item(UpsertContentItemInput(title="Locks", body="One order."))
        plans: list[UUID] = []

        async def publish() -> None:
            plan = await service.create_distribution_plan(
                CreateDistributionPlanInput(content_item_id=item.id, target_ids=targets, allow_duplicate=True)
            )
            plans.append(plan.id)

        for _ in range(10):
            await publish()

        def actor(name: str, step) -> object:
            async def run() -> None:
                rng = random.Random(name)
                for _ in range(ROUNDS):
                    try:
                        await step(rng)
                    except asyncpg.DeadlockDetectedError as exc:
                        failures.append(exc)
                    except DistributionError:
                        pass  # a refusal (a deactivated target, a plan retention removed), not a lock
                    counts[name] = counts.get(name, 0) + 1
                    await anyio.lowlevel.checkpoint()

            return run

        workers = [Worker(runtime, name=f"w{n}") for n in range(3)]

        def claim_and_record(worker: Worker):
            async def step(rng: random.Random) -> None:
                claimed = await worker.claim(20)
                if claimed:
                    await worker.record_many([outcome_for(job, rng) for job in claimed[: len(claimed) * 2 // 3]])

            return step

        def beat(worker: Worker):
            async def step(rng: random.Random) -> None:
                await worker.heartbeat()

            return step

        async def rescue(rng: random.Random) -> None:
            await workers[0].rescue()

        async def cancel(rng: random.Random) -> None:
            await service.cancel_plan(PlanRef(plan_id=rng.choice(plans)))

        async def deactivate(rng: random.Random) -> None:
            target = rng.choice(targets)
            await runtime.pool.execute(
                "UPDATE distribution_targets SET active = false WHERE id = $1 AND active", target
            )
            await runtime.pool.execute("UPDATE distribution_targets SET active = true WHERE id = $1", target)

        async def redrive(rng: random.Random) -> None:
            if rng.random() < 0.5:
                await service.redrive(plan_id=rng.choice(plans))
            else:
                await service.redrive(target_id=rng.choice(targets))

        async def prune(rng: random.Random) -> None:
            await retention.prune(runtime.pool, quick, batch_size=20)

        async def more_plans(rng: random.Random) -> None:
            await publish()

        steps = {
            **{f"claim and record {w.name}": claim_and_record(w) for w in workers},
            **{f"heartbeat {w.name}": beat(w) for w in workers},
            "rescue": rescue,
            "cancel": cancel,
            "deactivate": deactivate,
            "redrive": redrive,
            "retention": prune,
            "publish": more_plans,
        }
        with anyio.fail_after(100):
            async with anyio.create_task_group() as tg:
                for name, step in steps.items():
                    tg.start_soon(actor(name, step))
        jobs = await runtime.pool.fetchval("SELECT count(*) FROM distribution_jobs")
        relations = {
            oid: await runtime.pool.fetchval("SELECT relname FROM pg_class WHERE oid = $1", int(oid))
            for failure in failures
            for oid in re.findall(r"relation (\d+)", str(getattr(failure, "detail", "")))
        }
    assert not failures, f"{len(failures)} deadlock(s), e.g. {failures[0]}: {failures[0].detail} {relations}"
    assert counts == dict.fromkeys(steps, ROUNDS)
    assert jobs > 0
