"""Webhook deliveries per second: WordClaw's worker, pgqueuer 1.6 with aiohttp, and a plain aiohttp loop, in one run.

    .venv/bin/python bench/webhook_throughput.py [--jobs N] [--concurrency C] [--batch-size B] [--repeat K]
        [--systems LIST] [--profile DIR] [--database-url URL]

All of them POST N webhooks, C at a time, to the same fast receiver: a uvicorn app in a child
process on 127.0.0.1 (bench/receivers.py) that answers 200 with a tiny body and tallies what
it received, so that every run can be checked to have delivered each job exactly once.

- wordclaw: one real ``wordclaw-worker`` process (WORDCLAW_WORKER_CONCURRENCY=C,
  WORDCLAW_WORKER_BATCH_SIZE from --batch-size, by default the worker's own) draining N
  signed webhook jobs, enqueued as the service writes them (plans of 10, one transaction each)
  with the webhook adapter's own payload. Timed from the worker's registration (its first act
  once it has started) until no job is queued or running, polled every 0.1 s; its start-up is
  reported apart. Its peak RSS (VmHWM) is read just before it is stopped with SIGTERM.
  With --profile, py-spy samples it from its registration on (collapsed stacks).
- pgqueuer+aiohttp: pgqueuer's QueueManager in drain mode, on one asyncpg connection,
  draining N jobs that carry the same body; the entrypoint POSTs it with one shared
  ``aiohttp.ClientSession``. Two ways to hold it to C at once, both measured (--pgqueuer-modes):
  ``tasks`` (``max_concurrent_tasks=C``, batches of C/2, which lets claims overlap deliveries)
  and ``entrypoint`` (``concurrency_limit=C`` on the entrypoint, batches of C). Timed around
  ``QueueManager.run``, which includes its own start-up (schema checks, LISTEN).
- plain: no queue and no database; C tasks POSTing on one ``aiohttp.ClientSession``. The ceiling.

The comparisons send the same headers as a signed delivery, with a fixed signature: they do no
HMAC. WordClaw's worker runs whatever HTTP client its webhook adapter uses; this script only
counts what the receiver got. Every measurement gets a database of its own, dropped at the end.
Absolute figures depend on what else the machine does; compare the ratios, measured back to
back, in an order that rotates with each repeat.

Needs the project's ``bench`` extra (pgqueuer), aiohttp, uvicorn, and a PostgreSQL server it
may create databases on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
from anyio.abc import Process
from cryptography.fernet import Fernet
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.domain.types import QueueExecutionMode
from receivers import Received, end_process, received, receiver_process, receiver_stack
from scratch import (  # bench/scratch.py
    BenchmarkFailed,
    cpu_seconds,
    cpu_since,
    create_plan_arguments,
    deadline,
    scratch_database,
    server_cpu,
    until_signalled,
)

from queue_worker.adapters import AdapterOptions, AdapterRegistry
from queue_worker.adapters.webhook import new_signing_secret
from wordclaw_mcp import queries
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import ContentItem, RegisterTargetInput, TransformPolicy, UpsertContentItemInput
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BIN = Path(sys.executable).parent
PLAN_SIZE = 10  # jobs per plan, as in bench/queue_throughput.py
HTTP_TIMEOUT = 15.0  # the worker's default delivery timeout
# The drain is polled this often: at 20,000 jobs (10 s or more) it adds under 1 % of error.
POLL_INTERVAL = 0.1
# The worker's start-up is polled more finely, because the timed part begins when it ends.
STARTUP_POLL_INTERVAL = 0.01
ENTRYPOINT = "webhook"

WORDCLAW = "wordclaw"
PGQ_TASKS, PGQ_ENTRYPOINT = "tasks", "entrypoint"
PLAIN = "plain"

TITLE = "Webhook throughput"
SUMMARY = "One item, delivered to a webhook many times."
CANONICAL_URL = "https://example.com/posts/webhook-throughput"
# About 1 KB of payload once rendered, like bench/http_clients.py's body.
BODY = "# Webhook throughput\n\n" + "Lorem ipsum dolor sit amet, *consectetur* adipiscing elit. " * 12


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cpu:
    """CPU seconds a drain cost: the delivering process, the database's server processes, the receiver."""

    client: float
    database: float
    receiver: float = 0.0

    def per_delivery_us(self, jobs: int) -> tuple[float, float, float, float]:
        parts = (self.client, self.database, self.receiver)
        return (*(part / jobs * 1e6 for part in parts), sum(parts) / jobs * 1e6)


@dataclass(frozen=True)
class Measurement:
    system: str  # WORDCLAW, PGQ_TASKS, PGQ_ENTRYPOINT or PLAIN
    jobs: int
    seconds: float
    received: Received
    cpu: Cpu
    peak_in_flight: int | None = None  # seen by this process; None for the worker in its own process
    peak_rss_mb: float | None = None  # WordClaw's worker only
    startup_seconds: float | None = None  # WordClaw's worker only: spawn to registration, not timed

    @property
    def per_second(self) -> float:
        return self.jobs / self.seconds


def label(system: str, args: argparse.Namespace) -> str:
    concurrency = args.concurrency
    return {
        WORDCLAW: f"wordclaw-worker (concurrency {concurrency}, batch {args.batch_size})",
        PGQ_TASKS: f"pgqueuer+aiohttp (max_concurrent_tasks {concurrency}, batch {concurrency // 2})",
        PGQ_ENTRYPOINT: f"pgqueuer+aiohttp (concurrency_limit {concurrency}, batch {concurrency})",
        PLAIN: f"plain aiohttp loop ({concurrency} tasks)",
    }[system]


class InFlight:
    """Counts POSTs in flight, and the most there ever were, to check that C really ran at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    @asynccontextmanager
    async def one(self) -> AsyncIterator[None]:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            yield
        finally:
            self.now -= 1


# --- the comparisons' POST ------------------------------------------------------------------


def http_session(concurrency: int) -> aiohttp.ClientSession:
    """Configured as a delivery client should be: no proxies from the environment, a total timeout."""
    connector = aiohttp.TCPConnector(limit=max(100, concurrency))
    return aiohttp.ClientSession(
        connector=connector, trust_env=False, timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    )


# A v1 signature's length, so that the comparisons' requests are as long as WordClaw's.
FIXED_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


async def post(session: aiohttp.ClientSession, url: str, body: bytes, message_id: str) -> int:
    """One webhook POST with a signed delivery's headers; the status."""
    headers = {
        "content-type": "application/json",
        "user-agent": "WordClaw-Bench/0.1 (+webhook)",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": FIXED_SIGNATURE,
    }
    async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
        await response.read()
        return response.status


# --- WordClaw -------------------------------------------------------------------------------


def worker_env(database_url: str, home: Path, key: str, args: argparse.Namespace) -> dict[str, str]:
    """This environment without any WORDCLAW_* setting, plus the measurement's own."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("WORDCLAW_")}
    return {
        **env,
        "WORDCLAW_DATABASE_URL": database_url,
        "WORDCLAW_HOME": str(home),
        "WORDCLAW_SECRET_KEYS": key,
        "WORDCLAW_ALLOW_PRIVATE_TARGETS": "1",  # the receiver is on loopback
        "WORDCLAW_WORKER_CONCURRENCY": str(args.concurrency),
        "WORDCLAW_WORKER_BATCH_SIZE": str(args.batch_size),
    }


async def measure_wordclaw(args: argparse.Namespace, url: str, work: Path) -> Measurement:
    async with scratch_database(args.database_url, "webhook_bench") as database_url:
        home = work / f"wordclaw-{secrets.token_hex(4)}"
        home.mkdir()
        key = Fernet.generate_key().decode()
        plans = await enqueue_wordclaw(database_url, home, key, url, args.jobs)
        env = worker_env(database_url, home, key, args)
        conn = await asyncpg.connect(database_url)
        receiver_before = (await received(url)).cpu_seconds
        try:
            with deadline(args.timeout, "wordclaw"):
                startup, seconds, rss, cpu = await drain_with_worker(conn, env, home / "worker.log", args.profile)
            await verify_wordclaw(conn, args.jobs, plans)
        finally:
            await conn.close()
        await report_worker_log(home / "worker.log")
    tally = await check_received(WORDCLAW, url, args.jobs)
    cpu = replace(cpu, receiver=tally.cpu_seconds - receiver_before)
    return Measurement(WORDCLAW, args.jobs, seconds, tally, cpu, peak_rss_mb=rss, startup_seconds=startup)


async def enqueue_wordclaw(database_url: str, home: Path, key: str, url: str, jobs: int) -> int:
    """One signed webhook target, one item, and ``jobs`` jobs in plans of PLAN_SIZE, as the service writes them.

    The target goes through the service, so its secret is encrypted with ``key`` as the
    worker expects. Returns the number of plans.
    """
    settings = Settings(
        database_url=database_url, home=home, secret_keys=(key,), allow_private_targets=True, run_worker=False
    )
    async with Runtime.open(settings) as runtime:
        service = DistributionService(runtime)
        item = await service.upsert_content_item(
            UpsertContentItemInput(title=TITLE, body=BODY, summary=SUMMARY, canonical_url=CANONICAL_URL)
        )
        target = await service.register_target(
            RegisterTargetInput(
                name="receiver",
                channel_type="webhook",
                config={"url": url},
                secrets={"signingSecret": new_signing_secret()},
            )
        )
        payload = runtime.adapters.get("webhook").transform(item, TransformPolicy())
        options = {"transformPolicy": TransformPolicy().model_dump(mode="json", by_alias=True)}
        sizes = [PLAN_SIZE] * (jobs // PLAN_SIZE) + ([jobs % PLAN_SIZE] if jobs % PLAN_SIZE else [])
        async with runtime.pool.acquire() as conn:
            for size in sizes:
                # Priority 0: the plan of nobody waiting, as the service gives it.
                await conn.execute(
                    queries.CREATE_PLAN,
                    *create_plan_arguments(
                        item.id,
                        item.version,
                        [target.id] * size,
                        [payload] * size,
                        channel_type="webhook",
                        max_attempts=settings.max_attempts,
                        options=options,
                    ),
                )
        # Plan the first claims from real statistics, rather than whenever autovacuum gets to it.
        await runtime.pool.execute("ANALYZE")
    return len(sizes)


async def drain_with_worker(
    conn: asyncpg.Connection, env: dict[str, str], log: Path, profile: Path | None
) -> tuple[float, float, float, Cpu]:
    """Spawn ``wordclaw-worker``, wait for it to drain the queue, stop it.

    Returns the start-up and drain seconds, the peak RSS in MB, and the CPU the drain cost the
    worker and the database (this script's polling connection included: ten light queries a second).

    With ``profile``, py-spy samples the worker from its registration until it exits, into a
    file of collapsed stacks there (flamegraph.pl or speedscope read it).
    """
    with log.open("ab") as sink:
        spawned = time.perf_counter()
        process = await anyio.open_process(
            [str(BIN / "wordclaw-worker")], env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
        )
    try:
        # Its row in `workers` is written just before its first claim: the drain starts there.
        await wait_for(lambda: conn.fetchval(WORKER_REGISTERED), process, log, STARTUP_POLL_INTERVAL)
        sampler = await start_profiler(process.pid, profile) if profile else None
        worker_before, database_before = cpu_seconds(process.pid), await server_cpu(conn)
        ready = time.perf_counter()
        await wait_for(lambda: drained(conn), process, log, POLL_INTERVAL)
        done = time.perf_counter()
        cpu = Cpu(cpu_seconds(process.pid) - worker_before, cpu_since(database_before, await server_cpu(conn)))
        rss = peak_rss_mb(process.pid)
    finally:
        await end_process(process, grace=30)  # SIGTERM lets in-flight deliveries finish (20 s grace)
    if profile and sampler:
        await sampler.wait()  # py-spy writes its file once the worker has gone
    if process.returncode != 0:
        raise BenchmarkFailed(f"wordclaw-worker exited with {process.returncode} when stopped: {await tail(log)}")
    return ready - spawned, done - ready, rss, cpu


async def start_profiler(pid: int, directory: Path) -> Process:
    await anyio.Path(directory).mkdir(parents=True, exist_ok=True)
    output = directory / f"worker-{pid}.collapsed"
    print(f"    profiling the worker with py-spy into {output}", flush=True)
    return await anyio.open_process(
        [str(BIN / "py-spy"), "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", str(output)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


WORKER_REGISTERED = "SELECT EXISTS (SELECT 1 FROM workers)"

# Each EXISTS is answered from a partial index (claim, leases, dead letters), so polling costs
# next to nothing; counting succeeded jobs would scan the whole table ten times a second.
UNFINISHED = """
SELECT EXISTS (SELECT 1 FROM distribution_jobs WHERE status = 'queued')
    OR EXISTS (SELECT 1 FROM distribution_jobs WHERE status = 'running') AS unfinished,
       EXISTS (SELECT 1 FROM distribution_jobs WHERE status = 'failed') AS failed
"""


async def drained(conn: asyncpg.Connection) -> bool:
    row = await conn.fetchrow(UNFINISHED)
    if row["failed"]:
        error = await conn.fetchval("SELECT last_error FROM distribution_jobs WHERE status = 'failed' LIMIT 1")
        raise BenchmarkFailed(f"wordclaw: a job failed: {error}")
    return not row["unfinished"]


async def wait_for(check: Callable[[], Awaitable[Any]], process: Process, log: Path, interval: float) -> None:
    """Poll ``check`` until it is truthy; fail at once if the worker exits (the caller's deadline bounds it)."""
    while not await check():
        if process.returncode is not None:
            raise BenchmarkFailed(f"wordclaw-worker exited with {process.returncode}: {await tail(log)}")
        await anyio.sleep(interval)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchmarkFailed(f"no VmHWM in /proc/{pid}/status")


async def tail(log: Path) -> str:
    return (await anyio.Path(log).read_text())[-2000:]


async def verify_wordclaw(conn: asyncpg.Connection, jobs: int, plans: int) -> None:
    statuses = dict(await conn.fetch("SELECT status, count(*) FROM distribution_jobs GROUP BY status"))
    if statuses != {"succeeded": jobs}:
        raise BenchmarkFailed(f"wordclaw: expected {jobs} succeeded jobs, found {statuses}")
    receipts, ok = await conn.fetchrow(
        "SELECT count(*), count(*) FILTER (WHERE succeeded AND status_code = 200) FROM distribution_receipts"
    )
    if receipts != jobs or ok != jobs:
        raise BenchmarkFailed(f"wordclaw: {receipts} receipts, {ok} of them HTTP 200 and succeeded, for {jobs} jobs")
    plan_statuses = dict(await conn.fetch("SELECT status, count(*) FROM distribution_plans GROUP BY status"))
    if plan_statuses != {"succeeded": plans}:
        raise BenchmarkFailed(f"wordclaw: expected {plans} succeeded plans, found {plan_statuses}")


async def report_worker_log(log: Path) -> None:
    lines = [
        line for line in (await anyio.Path(log).read_text()).splitlines() if " WARNING " in line or " ERROR " in line
    ]
    if lines:
        print(f"    wordclaw-worker logged {len(lines)} warning(s) or error(s), the first ones:", flush=True)
        for line in lines[:5]:
            print(f"      {line}", flush=True)


# --- pgqueuer + aiohttp ---------------------------------------------------------------------


async def measure_pgqueuer(args: argparse.Namespace, mode: str, url: str, body: bytes) -> Measurement:
    concurrency = args.concurrency
    # tasks: a per-worker cap, which pgqueuer requires to be at least twice the batch;
    # entrypoint: a cap on the entrypoint's picked jobs, so a whole batch can be in flight.
    batch_size = concurrency // 2 if mode == PGQ_TASKS else concurrency
    async with scratch_database(args.database_url, "pgqueuer_webhook_bench") as database_url:
        conn = await asyncpg.connect(database_url)
        try:
            pgq = Queries(AsyncpgDriver(conn))
            await pgq.install()
            # The job carries the body, as a WordClaw job carries its payload.
            for offset in range(0, args.jobs, 5000):
                count = min(5000, args.jobs - offset)
                await pgq.enqueue([ENTRYPOINT] * count, [body] * count, [0] * count)
            await conn.execute("ANALYZE")  # as for WordClaw: plan the first claims from real statistics

            qm = QueueManager(pgq)
            in_flight = InFlight()
            statuses: list[int] = []
            prefix = secrets.token_hex(4)
            async with http_session(concurrency) as session:

                @qm.entrypoint(ENTRYPOINT, concurrency_limit=concurrency if mode == PGQ_ENTRYPOINT else 0)
                async def deliver(job: Job) -> None:
                    async with in_flight.one():
                        status = await post(session, url, job.payload or b"", f"{prefix}-{job.id}")
                    statuses.append(status)
                    if status != 200:
                        raise RuntimeError(f"answered {status}")

                receiver_before = (await received(url)).cpu_seconds
                database_before, client_before = await server_cpu(conn), time.process_time()
                started = time.perf_counter()
                with deadline(args.timeout, label(mode, args)):
                    await qm.run(
                        batch_size=batch_size,
                        mode=QueueExecutionMode.drain,
                        max_concurrent_tasks=concurrency if mode == PGQ_TASKS else None,
                    )
                seconds = time.perf_counter() - started
                cpu = Cpu(time.process_time() - client_before, cpu_since(database_before, await server_cpu(conn)))
            await verify_pgqueuer(conn, pgq, mode, args.jobs, statuses, in_flight.peak, concurrency)
        finally:
            await conn.close()
    tally = await check_received(mode, url, args.jobs)
    cpu = replace(cpu, receiver=tally.cpu_seconds - receiver_before)
    return Measurement(mode, args.jobs, seconds, tally, cpu, peak_in_flight=in_flight.peak)


async def verify_pgqueuer(
    conn: asyncpg.Connection, pgq: Queries, mode: str, jobs: int, statuses: list[int], peak: int, concurrency: int
) -> None:
    # Completed jobs leave the queue table for the log table.
    names = pgq.qbe.settings.qualified
    left = await conn.fetchval(f"SELECT count(*) FROM {names.queue_table}")
    logged = await conn.fetchval(f"SELECT count(*) FROM {names.queue_table_log} WHERE status = 'successful'")
    ok = statuses.count(200)
    if left or logged != jobs or len(statuses) != jobs or ok != jobs:
        raise BenchmarkFailed(
            f"{mode}: {left} jobs left, {logged} logged successful, {len(statuses)} POSTs, {ok} answered 200; "
            f"expected 0, {jobs}, {jobs}, {jobs}"
        )
    if peak > concurrency:
        raise BenchmarkFailed(f"{mode}: {peak} POSTs were in flight at once, above the concurrency of {concurrency}")


# --- the plain loop -------------------------------------------------------------------------


async def measure_plain(args: argparse.Namespace, url: str, body: bytes) -> Measurement:
    remaining, in_flight = args.jobs, InFlight()
    statuses: list[int] = []
    prefix = secrets.token_hex(4)

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with in_flight.one():
                statuses.append(await post(session, url, body, f"{prefix}-{remaining}"))

    receiver_before = (await received(url)).cpu_seconds
    async with http_session(args.concurrency) as session:
        client_before = time.process_time()
        started = time.perf_counter()
        with deadline(args.timeout, PLAIN):
            async with anyio.create_task_group() as tg:
                for _ in range(args.concurrency):
                    tg.start_soon(sender, session)
        seconds = time.perf_counter() - started
        client = time.process_time() - client_before
    if len(statuses) != args.jobs or statuses.count(200) != args.jobs:
        raise BenchmarkFailed(f"plain: {statuses.count(200)} of {len(statuses)} POSTs answered 200, for {args.jobs}")
    tally = await check_received(PLAIN, url, args.jobs)
    cpu = Cpu(client, 0.0, tally.cpu_seconds - receiver_before)
    return Measurement(PLAIN, args.jobs, seconds, tally, cpu, peak_in_flight=in_flight.peak)


# --- checks, the run and the report ---------------------------------------------------------


async def check_received(system: str, url: str, jobs: int) -> Received:
    """The receiver must have had exactly one POST per job, each with its own webhook-id."""
    tally = await received(url)
    if tally.posts != jobs or tally.distinct_ids != jobs:
        raise BenchmarkFailed(
            f"{system}: the receiver got {tally.posts} POSTs with {tally.distinct_ids} distinct webhook-ids "
            f"for {jobs} jobs"
        )
    return tally


async def comparison_body() -> bytes:
    """The webhook adapter's payload for an item like the one WordClaw delivers, encoded as the adapter does."""
    now = datetime.now(UTC)
    item = ContentItem(
        id=uuid.uuid4(),
        title=TITLE,
        body=BODY,
        summary=SUMMARY,
        canonical_url=CANONICAL_URL,
        metadata={},
        version=1,
        created_at=now,
        updated_at=now,
    )
    adapters = AdapterRegistry(AdapterOptions(allow_private_targets=True))
    try:
        payload = adapters.get("webhook").transform(item, TransformPolicy())
    finally:
        await adapters.aclose()
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


async def run(args: argparse.Namespace) -> list[Measurement]:
    """Every measurement; SIGINT or SIGTERM stops the run, after dropping its database and ending its processes."""
    results: list[Measurement] = []
    await until_signalled(lambda: measure_all(args, results))
    return results


async def measure_all(args: argparse.Namespace, results: list[Measurement]) -> None:
    body = await comparison_body()
    systems = [system for system in (WORDCLAW, *args.pgqueuer_modes, PLAIN) if system in args.systems]
    with tempfile.TemporaryDirectory(prefix="wordclaw-webhook-bench-") as tmp:
        work = Path(tmp)
        async with receiver_process("bench", 0.0, work / "receiver.log") as base_url:
            print(f"receiver {base_url}: {receiver_stack()}; comparison body {len(body):,} bytes", flush=True)
            for repeat in range(args.repeat):
                # Rotated, so that no system always runs first or last.
                order = systems[repeat % len(systems) :] + systems[: repeat % len(systems)]
                for system in order:
                    url = f"{base_url}/{system}-{repeat}"  # a path of its own, so its tally is its own
                    if system == WORDCLAW:
                        result = await measure_wordclaw(args, url, work)
                    elif system == PLAIN:
                        result = await measure_plain(args, url, body)
                    else:
                        result = await measure_pgqueuer(args, system, url, body)
                    results.append(result)
                    print(f"  repeat {repeat + 1}: {describe(result, args)}", flush=True)


def describe(result: Measurement, args: argparse.Namespace) -> str:
    extra = ""
    if result.peak_rss_mb is not None:
        extra = f", start-up {result.startup_seconds:.2f} s (not timed), peak RSS {result.peak_rss_mb:.0f} MB"
    return f"{label(result.system, args)}: {result.seconds:.2f} s, {result.per_second:,.0f} deliveries/s{extra}"


def report(results: Sequence[Measurement], args: argparse.Namespace) -> None:
    grouped: dict[str, list[Measurement]] = {}
    for result in results:
        grouped.setdefault(result.system, []).append(result)
    rates = {system: statistics.median(r.per_second for r in runs) for system, runs in grouped.items()}

    print()
    print(f"{args.jobs:,} webhook deliveries per system, {args.concurrency} at a time, {args.repeat} repeat(s)")
    header = f"{'system':<62} {'deliveries/s':>12} {'x plain':>8} {'in flight':>9} {'bytes/POST':>10}"
    print(header)
    print("-" * len(header))
    plain = rates.get(PLAIN)
    for system, runs in grouped.items():
        peak = max((r.peak_in_flight or 0) for r in runs) or "-"
        size = runs[0].received.bytes / runs[0].received.posts
        ratio = f"{rates[system] / plain:>7.2f}x" if plain else f"{'-':>8}"
        print(f"{label(system, args):<62} {rates[system]:>12,.0f} {ratio} {peak:>9} {size:>10,.0f}")
    if args.repeat > 1:
        print("(median of the repeats; in flight: the most POSTs this process had in flight at once)")
    else:
        print("(in flight: the most POSTs this process had in flight at once)")

    print()
    header = f"{'CPU per delivery, µs (median)':<62} {'deliverer':>9} {'database':>9} {'receiver':>9} {'total':>9}"
    print(header)
    print("-" * len(header))
    for system, runs in grouped.items():
        figures = [statistics.median(r.cpu.per_delivery_us(r.jobs)[i] for r in runs) for i in range(4)]
        print(f"{label(system, args):<62} " + " ".join(f"{figure:>9,.0f}" for figure in figures))
    print("(deliverer: the worker process, or this one for pgqueuer and the plain loop)")
    if WORDCLAW not in rates:
        return

    print()
    wordclaw = rates[WORDCLAW]
    for system in (PGQ_TASKS, PGQ_ENTRYPOINT, PLAIN):
        if system in rates:
            print(f"wordclaw / {label(system, args)} = {wordclaw / rates[system]:.2f}")
    runs = grouped[WORDCLAW]
    rss = max(r.peak_rss_mb or 0.0 for r in runs)
    startup = statistics.median(r.startup_seconds or 0.0 for r in runs)
    print(f"wordclaw-worker peak RSS (VmHWM): {rss:.0f} MB; start-up, spawn to registration: {startup:.2f} s")


def machine() -> str:
    load = " ".join(f"{figure:.2f}" for figure in os.getloadavg())
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC, {os.cpu_count()} cores, load {load}, "
        f"Python {platform.python_version()}, aiohttp {version('aiohttp')}, pgqueuer {version('pgqueuer')}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20000, help="deliveries per system (default 20000)")
    parser.add_argument("--concurrency", type=int, default=20, help="deliveries in flight at once (default 20)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=Settings().worker_batch_size,
        help=f"the worker's claim batch (default: its own, {Settings().worker_batch_size})",
    )
    parser.add_argument("--repeat", type=int, default=1, help="measure every system K times (default 1)")
    parser.add_argument("--database-url", default=DEFAULT_URL, help=f"an admin URL (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per drain (default 300)")
    parser.add_argument(
        "--systems",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=[WORDCLAW, PGQ_TASKS, PGQ_ENTRYPOINT, PLAIN],
        help=f"comma-separated, of {WORDCLAW}, {PGQ_TASKS}, {PGQ_ENTRYPOINT} and {PLAIN} (default all)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="attach py-spy to the worker once it has registered; write its samples to this directory",
    )
    parser.add_argument(
        "--pgqueuer-modes",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=[PGQ_TASKS, PGQ_ENTRYPOINT],
        help=f"comma-separated, of {PGQ_TASKS} and {PGQ_ENTRYPOINT} (default both)",
    )
    args = parser.parse_args(argv)
    if unknown := set(args.systems) - {WORDCLAW, PGQ_TASKS, PGQ_ENTRYPOINT, PLAIN}:
        parser.error(f"unknown --systems {sorted(unknown)}")
    if min(args.jobs, args.concurrency, args.repeat, args.batch_size) < 1:
        parser.error("--jobs, --concurrency, --repeat and --batch-size must be at least 1")
    if unknown := set(args.pgqueuer_modes) - {PGQ_TASKS, PGQ_ENTRYPOINT}:
        parser.error(f"unknown --pgqueuer-modes {sorted(unknown)}; use {PGQ_TASKS} and/or {PGQ_ENTRYPOINT}")
    if PGQ_TASKS in args.pgqueuer_modes and args.concurrency < 2:
        parser.error(f"--pgqueuer-modes {PGQ_TASKS} needs --concurrency 2 or more (batches of concurrency / 2)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"before: {machine()}", flush=True)
    try:
        results = anyio.run(run, args)
    except BenchmarkFailed as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"after:  {machine()}", flush=True)
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
