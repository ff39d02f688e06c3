"""Drain throughput of WordClaw's job queue against pgqueuer 1.6, measured in one run.

    .venv/bin/python bench/queue_throughput.py [--jobs N] [--database-url URL] [--repeat K]

Both systems get the same N pre-enqueued jobs with a handler that does nothing, so what is
timed is the queue machinery alone: claiming, bookkeeping and completing jobs. Every
measurement runs on a database of its own, created here and dropped at the end, so no run
inherits another's dead rows. Absolute figures depend on whatever else the machine is doing;
compare the ratios, which are measured back to back within one run.

Needs the project's ``bench`` extra (pgqueuer) and a PostgreSQL server it may create databases on.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from uuid import UUID

import anyio
import asyncpg
from cryptography.fernet import Fernet
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.domain.types import QueueExecutionMode
from pydantic import BaseModel
from scratch import (  # bench/scratch.py, beside this script
    BENCH_AGENT,
    BENCH_TENANT,
    BenchmarkFailed,
    create_plan_arguments,
    deadline,
    scratch_database,
)

from queue_worker.adapters import Adapter, DeliveryResult, DeliveryTarget, ResendSafety
from queue_worker.worker import Worker
from wordclaw_mcp import queries
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import ContentItem, TransformPolicy
from wordclaw_mcp.runtime import Runtime

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
NOOP = "noop"


# --- the no-op channel ----------------------------------------------------------------------


class NoopConfig(BaseModel):
    pass


class NoopAdapter(Adapter):
    """Delivers instantly, so the worker's time is all queue overhead."""

    channel_type: ClassVar[str] = NOOP
    config_model: ClassVar[type[BaseModel]] = NoopConfig
    # As the webhook channel declares: a resend is made safe by the job id the request carries.
    # Left to the default (none), every delivery would be marked as sending first.
    resend: ClassVar[ResendSafety] = ResendSafety("idempotency_key")

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.delivered = 0
        self.expected = expected
        self.all_delivered = anyio.Event()

    def transform(self, content: ContentItem, policy: TransformPolicy) -> dict[str, Any]:
        return {"title": content.title}

    async def deliver(
        self, payload: dict[str, Any], target: DeliveryTarget, *, message_id: str | None = None
    ) -> DeliveryResult:
        self.delivered += 1
        if self.delivered >= self.expected:
            self.all_delivered.set()
        return DeliveryResult(succeeded=True, status_code=200)


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    system: str  # "wordclaw" or "pgqueuer"
    batch_size: int
    jobs: int
    plan_size: int | None = None  # WordClaw only: jobs per plan
    triggers: bool = True  # WordClaw only: False is the diagnostic run without job triggers
    daemon: bool = False  # WordClaw only: Worker.run() (pipelined claims, group commit) not run_once()

    @property
    def label(self) -> str:
        if self.system != "wordclaw":
            return self.system
        shape = "one plan" if self.plan_size == self.jobs else f"{self.plan_size} jobs/plan"
        mode = ", daemon" if self.daemon else ""
        return f"wordclaw{mode}, {shape}" + ("" if self.triggers else ", NO TRIGGERS*")


@dataclass(frozen=True)
class Measurement:
    config: Config
    enqueue_seconds: float
    drain_seconds: float

    @property
    def jobs_per_second(self) -> float:
        return self.config.jobs / self.drain_seconds


# --- databases ------------------------------------------------------------------------------


async def drain_with_deadline(
    step: Callable[[], Awaitable[int]], *, what: str, jobs: int, batch_size: int, limit: float
) -> int:
    """Call ``step`` (returning the number of jobs it claimed) until it claims none; the rounds taken.

    Bounded twice over, by a deadline and by a round count no correct drain can reach,
    so a queue that stops making progress fails the benchmark instead of hanging it.
    """
    max_rounds = 2 * math.ceil(jobs / batch_size) + 10
    rounds = 0
    with deadline(limit, what):
        while await step():
            rounds += 1
            if rounds > max_rounds:
                raise BenchmarkFailed(f"{what}: still claiming after {rounds} rounds for {jobs} jobs")
    return rounds


# --- WordClaw -------------------------------------------------------------------------------


async def measure_wordclaw(admin_url: str, config: Config, limit: float) -> Measurement:
    assert config.plan_size is not None
    async with scratch_database(admin_url, "wordclaw_bench") as url:
        with tempfile.TemporaryDirectory(prefix="wordclaw-bench-") as home:
            settings = Settings(
                database_url=url,
                home=Path(home),
                secret_keys=(Fernet.generate_key().decode(),),
                allow_private_targets=True,
                run_worker=False,
                worker_batch_size=config.batch_size,
                # run_once ignores it; the daemon keeps two batches in flight so claims overlap deliveries.
                worker_concurrency=2 * config.batch_size,
            )
            async with Runtime.open(settings) as runtime:
                adapter = NoopAdapter(expected=config.jobs)
                runtime.adapters.register(adapter)
                plans, enqueue_seconds = await enqueue_wordclaw(runtime, adapter, config)
                # Autovacuum would get to it within a minute, mid-drain or not; doing it now
                # means every run's claims are planned from the same, real statistics.
                await runtime.pool.execute("ANALYZE")
                if not config.triggers:
                    await runtime.pool.execute("ALTER TABLE distribution_jobs DISABLE TRIGGER USER")

                worker = Worker(runtime, name="bench")
                started = time.perf_counter()
                if config.daemon:
                    with deadline(limit, config.label):
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(worker.run)
                            await adapter.all_delivered.wait()
                            worker.stop()  # run() returns once every outcome is written
                else:
                    await drain_with_deadline(
                        worker.run_once, what=config.label, jobs=config.jobs, batch_size=config.batch_size, limit=limit
                    )
                drain_seconds = time.perf_counter() - started

                await verify_wordclaw(runtime, adapter, config, plans)
    return Measurement(config, enqueue_seconds, drain_seconds)


async def enqueue_wordclaw(runtime: Runtime, adapter: NoopAdapter, config: Config) -> tuple[int, float]:
    """The jobs as the service creates them: a plan and its fan-out per transaction. Returns (plans, seconds)."""
    assert config.plan_size is not None
    pool = runtime.pool
    row = await pool.fetchrow(
        queries.INSERT_CONTENT_ITEM, "Benchmark", "A *tiny* body.", None, None, {}, BENCH_TENANT, BENCH_AGENT
    )
    content = ContentItem.model_validate(dict(row))
    payload = adapter.transform(content, TransformPolicy())
    options = {"transformPolicy": TransformPolicy().model_dump(mode="json", by_alias=True)}
    target_row = await pool.fetchrow(
        queries.INSERT_TARGET, uuid.uuid4(), "noop-target", NOOP, {}, None, None, None, None, BENCH_TENANT, None, False
    )
    target_id: UUID = target_row["id"]

    sizes = [config.plan_size] * (config.jobs // config.plan_size)
    if config.jobs % config.plan_size:
        sizes.append(config.jobs % config.plan_size)
    started = time.perf_counter()
    async with pool.acquire() as conn:
        for size in sizes:
            await conn.execute(
                queries.CREATE_PLAN,
                *create_plan_arguments(
                    content.id,
                    content.version,
                    [target_id] * size,
                    [payload] * size,
                    channel_type=NOOP,
                    max_attempts=runtime.settings.max_attempts,
                    options=options,
                ),
            )
    return len(sizes), time.perf_counter() - started


async def verify_wordclaw(runtime: Runtime, adapter: NoopAdapter, config: Config, plans: int) -> None:
    jobs = dict(await runtime.pool.fetch("SELECT status, count(*) FROM distribution_jobs GROUP BY status"))
    if jobs != {"succeeded": config.jobs}:
        raise BenchmarkFailed(f"{config.label}: expected {config.jobs} succeeded jobs, found {jobs}")
    if adapter.delivered != config.jobs:
        raise BenchmarkFailed(f"{config.label}: {adapter.delivered} deliveries for {config.jobs} jobs")
    receipts = await runtime.pool.fetchval("SELECT count(*) FROM distribution_receipts WHERE succeeded")
    if receipts != config.jobs:
        raise BenchmarkFailed(f"{config.label}: {receipts} receipts for {config.jobs} jobs")
    if not config.triggers:
        return  # with the roll-up trigger off, plan status is stale by design
    plan_statuses = dict(await runtime.pool.fetch("SELECT status, count(*) FROM distribution_plans GROUP BY status"))
    if plan_statuses != {"succeeded": plans}:
        raise BenchmarkFailed(f"{config.label}: expected {plans} succeeded plans, found {plan_statuses}")


# --- pgqueuer -------------------------------------------------------------------------------


async def measure_pgqueuer(admin_url: str, config: Config, limit: float) -> Measurement:
    async with scratch_database(admin_url, "pgqueuer_bench") as url:
        conn = await asyncpg.connect(url)
        try:
            pgq = Queries(AsyncpgDriver(conn))
            await pgq.install()
            started = time.perf_counter()
            # One multi-row INSERT per chunk: how pgqueuer's batch enqueue is meant to be used.
            for offset in range(0, config.jobs, 5000):
                count = min(5000, config.jobs - offset)
                await pgq.enqueue([NOOP] * count, [None] * count, [0] * count)
            enqueue_seconds = time.perf_counter() - started
            await conn.execute("ANALYZE")  # as for WordClaw: plan the first claims from real statistics

            qm = QueueManager(pgq)
            handled = 0

            @qm.entrypoint(NOOP)
            async def noop(job: Job) -> None:
                nonlocal handled
                handled += 1

            started = time.perf_counter()
            with deadline(limit, config.label):
                await qm.run(batch_size=config.batch_size, mode=QueueExecutionMode.drain)
            drain_seconds = time.perf_counter() - started

            # Completed jobs leave the queue table for the log table.
            names = pgq.qbe.settings.qualified
            left = await conn.fetchval(f"SELECT count(*) FROM {names.queue_table}")
            logged = await conn.fetchval(f"SELECT count(*) FROM {names.queue_table_log} WHERE status = 'successful'")
            if left or logged != config.jobs or handled != config.jobs:
                raise BenchmarkFailed(
                    f"pgqueuer: {left} jobs left, {logged} logged successful, {handled} handled; "
                    f"expected 0, {config.jobs}, {config.jobs}"
                )
        finally:
            await conn.close()
    return Measurement(config, enqueue_seconds, drain_seconds)


# --- the run --------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> list[Measurement]:
    results: list[Measurement] = []

    async def measure(config: Config) -> None:
        measure_one = measure_wordclaw if config.system == "wordclaw" else measure_pgqueuer
        result = await measure_one(args.database_url, config, args.timeout)
        print(
            f"  {config.label:<38} batch {config.batch_size:>3}: {result.drain_seconds:7.2f} s, "
            f"{result.jobs_per_second:8.0f} jobs/s",
            flush=True,
        )
        results.append(result)

    for repeat in range(args.repeat):
        if args.repeat > 1:
            print(f"repeat {repeat + 1}/{args.repeat}", flush=True)
        # Each batch size's WordClaw and pgqueuer runs go back to back, so they share the
        # same background load as far as possible.
        for batch_size in args.batch_sizes:
            for plan_size in args.plan_sizes:
                await measure(Config("wordclaw", batch_size, args.jobs, plan_size=plan_size))
                await measure(Config("wordclaw", batch_size, args.jobs, plan_size=plan_size, daemon=True))
            await measure(Config("pgqueuer", batch_size, args.jobs))
            if args.trigger_diagnostic:
                plan_size = args.plan_sizes[0]
                await measure(Config("wordclaw", batch_size, args.jobs, plan_size=plan_size, triggers=False))
        if args.big_plan_jobs:
            for batch_size in args.batch_sizes:
                big = args.big_plan_jobs
                await measure(Config("wordclaw", batch_size, big, plan_size=big))
    return results


def report(results: Sequence[Measurement]) -> None:
    grouped: dict[Config, list[Measurement]] = {}
    for result in results:
        grouped.setdefault(result.config, []).append(result)

    print()
    header = f"{'system':<38} {'batch':>5} {'jobs':>7} {'enqueue s':>10} {'drain s':>9} {'jobs/s':>9}"
    print(header)
    print("-" * len(header))
    median_rate: dict[Config, float] = {}
    for config, runs in grouped.items():
        seconds = statistics.median(r.drain_seconds for r in runs)
        enqueue = statistics.median(r.enqueue_seconds for r in runs)
        median_rate[config] = config.jobs / seconds
        print(
            f"{config.label:<38} {config.batch_size:>5} {config.jobs:>7} {enqueue:>10.2f} "
            f"{seconds:>9.2f} {median_rate[config]:>9.0f}"
        )
    if len(next(iter(grouped.values()))) > 1:
        print("(median of the repeats)")
    if any(not config.triggers for config in grouped):
        print("* diagnostic: job triggers disabled (no plan roll-up, no outbox events); not a valid configuration")

    print()
    for config, rate in median_rate.items():
        if config.system != "wordclaw":
            continue
        peers = [
            peer_rate
            for peer, peer_rate in median_rate.items()
            if peer.system == "pgqueuer" and peer.batch_size == config.batch_size and peer.jobs == config.jobs
        ]
        if peers:
            print(f"batch {config.batch_size:>3}: {config.label} / pgqueuer = {rate / peers[0]:.2f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20000, help="jobs per drain (default 20000)")
    parser.add_argument("--database-url", default=DEFAULT_URL, help=f"an admin URL (default {DEFAULT_URL})")
    parser.add_argument("--repeat", type=int, default=1, help="measure every configuration K times (default 1)")
    parser.add_argument("--batch-sizes", type=_int_list, default=[10, 100], help="comma-separated (default 10,100)")
    parser.add_argument("--plan-sizes", type=_int_list, default=[10], help="WordClaw jobs per plan (default 10)")
    parser.add_argument(
        "--big-plan-jobs",
        type=int,
        default=5000,
        help="also drain WordClaw with all jobs in one plan, this many of them (default 5000; 0 skips). "
        "Kept below --jobs because each completion re-reads the whole plan, so this grows quadratically",
    )
    parser.add_argument(
        "--no-trigger-diagnostic",
        dest="trigger_diagnostic",
        action="store_false",
        help="skip the WordClaw drain with its job triggers disabled",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per drain (default 120)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.repeat < 1 or min(args.batch_sizes + args.plan_sizes) < 1:
        parser.error("--jobs, --repeat, --batch-sizes and --plan-sizes must be positive")
    return args


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"draining {args.jobs} no-op jobs per configuration on {args.database_url}", flush=True)
    try:
        results = anyio.run(run, args)
    except BenchmarkFailed as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
