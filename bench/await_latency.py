"""Latency of an awaited delivery through ``wordclaw-mcp`` over stdio, on an idle queue and behind a backlog.

    .venv/bin/python bench/await_latency.py [--samples N] [--backlog N] [--database-url URL] [--modes M,M]

Times ``create_distribution_plan`` with ``awaitDelivery: true`` to one fast webhook target, as
an agent sees it: the SDK's ``mcp.Client`` spawns ``wordclaw-mcp`` over stdio, and each sample
runs from the call to the reply. A sample counts as succeeded only when the plan came back
``succeeded`` with an HTTP 200 receipt; timeouts (``awaitTimedOut``), failed plans and tool
errors are counted and reported, never dropped.

Scenarios, each on a database of its own (created here, dropped at the end):

- idle: nothing else queued; ``--warmup`` round trips, then ``--samples`` timed ones;
- backlog: ``--backlog`` jobs (plans of 10) to a slow target, enqueued before the worker
  starts, then awaited round trips to the fast target while that backlog drains, bounded by
  ``--backlog-samples`` and ``--backlog-seconds``.

Each runs with the worker inside the server (``--with-worker``) and with a separate
``wordclaw-worker`` process beside ``wordclaw-mcp --no-worker`` (``--modes``).

The floor, in the same run and against the same fast receiver: one INSERT, one POST with an
``wordclaw_mcp.http.HttpClient`` (the worker's HTTP layer) and one UPDATE, on a small table of the
scenario's database, on the idle queue and again while the backlog drains.

Receivers are small uvicorn apps in child processes on 127.0.0.1. ``WebhookReceiver`` (the
tests' ThreadingHTTPServer) is not fast enough to be the fast target: it writes the status line
and headers apart from the body, so Nagle's algorithm and delayed ACKs hold every answer
about 40 ms.

Needs a PostgreSQL server it may create databases on, and uvicorn in the environment.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from anyio.abc import Process
from cryptography.fernet import Fernet
from mcp import Client, StdioServerParameters
from receivers import end_process, receiver_process  # bench/receivers.py, beside this script
from scratch import (  # bench/scratch.py
    BenchmarkFailed,
    create_plan_arguments,
    deadline,
    scratch_database,
    setup_call,
    until_signalled,
)

from queue_worker.adapters import AdapterOptions
from wordclaw_mcp import queries
from wordclaw_mcp.database import connect
from wordclaw_mcp.models import TransformPolicy

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BIN = Path(sys.executable).parent
# Where the measured code is imported from (the spawned commands import it from the same place).
CODE = Path(queries.__file__).resolve().parent.parent
# Jobs per plan when enqueueing the backlog, as in bench/queue_throughput.py.
PLAN_SIZE = 10
MAX_ATTEMPTS = 8  # the default of WORDCLAW_MAX_ATTEMPTS
# How long the client waits for any one reply. The server's own await ends at 10 s.
REPLY_TIMEOUT = 60.0
call = functools.partial(setup_call, reply_seconds=REPLY_TIMEOUT)

SUCCEEDED, TIMED_OUT, FAILED = "succeeded", "timed out", "failed"
IN_SERVER, SEPARATE = "in-server", "separate"
MODE_LABELS = {
    IN_SERVER: "--with-worker",
    SEPARATE: "--no-worker + wordclaw-worker",
}


# --- figures --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q % of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def describe(values: Sequence[float]) -> str:
    if not values:
        return "-"
    ms = [v * 1000 for v in values]
    return f"p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms, max {max(ms):.1f} ms"


@dataclass(frozen=True)
class Sample:
    seconds: float
    outcome: str
    detail: str = ""


@dataclass
class RoundTrips:
    label: str
    idle: bool
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def seconds(self, outcome: str) -> list[float]:
        return [s.seconds for s in self.samples if s.outcome == outcome]

    def count(self, outcome: str) -> int:
        return sum(1 for s in self.samples if s.outcome == outcome)


@dataclass
class Floor:
    label: str
    total: list[float] = field(default_factory=list)
    insert: list[float] = field(default_factory=list)
    post: list[float] = field(default_factory=list)
    update: list[float] = field(default_factory=list)


@dataclass
class Results:
    round_trips: list[RoundTrips] = field(default_factory=list)
    floors: list[Floor] = field(default_factory=list)


# --- databases and processes ----------------------------------------------------------------


def process_env(database_url: str, home: Path) -> dict[str, str]:
    """This environment without any WORDCLAW_* setting, plus the scenario's own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WORDCLAW_")}
    return {
        **env,
        "WORDCLAW_DATABASE_URL": database_url,
        "WORDCLAW_ALLOW_PRIVATE_TARGETS": "1",
        "WORDCLAW_HOME": str(home),
        "WORDCLAW_SECRET_KEYS": Fernet.generate_key().decode(),
        "WORDCLAW_LOCAL_AGENT": "1",
    }


@asynccontextmanager
async def worker_process(env: dict[str, str], log: Path) -> AsyncIterator[Process]:
    with log.open("ab") as sink:
        process = await anyio.open_process(
            [str(BIN / "wordclaw-worker")], env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
        )
    try:
        yield process
    finally:
        await end_process(process, grace=30)  # SIGTERM lets in-flight deliveries finish (20 s grace)


@asynccontextmanager
async def wordclaw(env: dict[str, str], mode: str | None, logs: Path) -> AsyncIterator[Client]:
    """``wordclaw-mcp`` over stdio. ``mode`` None: no delivery at all (for setting up)."""
    async with AsyncExitStack() as stack:
        if mode == SEPARATE:
            await stack.enter_async_context(worker_process(env, logs / "worker.log"))
        args = ["--with-worker"] if mode == IN_SERVER else ["--no-worker"]
        params = StdioServerParameters(command=str(BIN / "wordclaw-mcp"), args=args, env=env)
        yield await stack.enter_async_context(Client(params))


async def report_worker_log(home: Path) -> None:
    """The separate worker's warnings and errors (the in-server worker's go to this process's stderr)."""
    log = anyio.Path(home / "worker.log")
    if not await log.exists():
        return
    lines = [line for line in (await log.read_text()).splitlines() if " WARNING " in line or " ERROR " in line]
    if lines:
        print(f"    wordclaw-worker logged {len(lines)} warning(s) or error(s), the first ones:", flush=True)
        for line in lines[:5]:
            print(f"      {line}", flush=True)


@dataclass(frozen=True)
class Setup:
    item: dict[str, Any]
    fast_target: str
    fast_payload: dict[str, Any]
    slow_target: str | None = None
    slow_payload: dict[str, Any] | None = None


async def set_up(client: Client, fast_url: str, slow_url: str | None = None) -> Setup:
    """A content item and the targets, through the tools; each target's payload from a dry run."""
    item = await call(
        client,
        "upsert_content_item",
        title="Await latency",
        body="# Await latency\n\nA short body, *rendered* per target.",
        summary="One item, published many times.",
        canonicalUrl="https://example.com/await-latency",
    )

    async def target(name: str, url: str) -> tuple[str, dict[str, Any]]:
        registered = await call(client, "register_target", name=name, channelType="webhook", config={"url": url})
        preview = await call(
            client, "create_distribution_plan", contentItemId=item["id"], targetIds=[registered["id"]], dryRun=True
        )
        return registered["id"], preview["previews"][0]["payload"]

    fast_id, fast_payload = await target("fast", fast_url)
    if slow_url is None:
        return Setup(item, fast_id, fast_payload)
    slow_id, slow_payload = await target("slow", slow_url)
    return Setup(item, fast_id, fast_payload, slow_id, slow_payload)


# --- the round trip and the floor -----------------------------------------------------------


async def awaited_round_trip(client: Client, setup: Setup) -> Sample:
    arguments = {
        "contentItemId": setup.item["id"],
        "targetIds": [setup.fast_target],
        "awaitDelivery": True,
        "allowDuplicate": True,
    }
    started = time.perf_counter()
    try:
        result = await client.call_tool("create_distribution_plan", arguments, read_timeout_seconds=REPLY_TIMEOUT)
    except Exception as exc:  # no reply, or a protocol error: a failed sample, reported
        return Sample(time.perf_counter() - started, FAILED, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    if result.is_error:
        return Sample(seconds, FAILED, result.content[0].text[:300])
    plan = result.structured_content or {}
    if plan.get("awaitTimedOut"):
        jobs = [job.get("status") for job in plan.get("jobs") or []]
        return Sample(seconds, TIMED_OUT, f"plan {plan.get('status')}, jobs {jobs}")
    receipts = plan.get("receipts") or []
    if plan.get("status") == SUCCEEDED and receipts and all(r.get("statusCode") == 200 for r in receipts):
        return Sample(seconds, SUCCEEDED)
    errors = [r.get("errorMessage") for r in receipts]
    return Sample(seconds, FAILED, f"plan {plan.get('status')}, receipts {errors}")


FLOOR_TABLE = """
CREATE TABLE IF NOT EXISTS bench_floor (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz
)
"""
FLOOR_INSERT = "INSERT INTO bench_floor (status, payload) VALUES ('queued', $1) RETURNING id"
FLOOR_UPDATE = "UPDATE bench_floor SET status = 'succeeded', updated_at = now() WHERE id = $1"


async def measure_floor(label: str, database_url: str, url: str, payload: dict[str, Any], args: Any) -> Floor:
    """INSERT a row, POST the target's payload, UPDATE the row: each its own commit, back to back."""
    floor = Floor(label)
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    conn = await connect(database_url)
    try:
        await conn.execute(FLOOR_TABLE)
        # The worker's own HTTP layer, as the webhook adapter uses it (wordclaw_mcp/http.py).
        http = AdapterOptions(allow_private_targets=True, timeout=15.0).http_client()
        try:
            for index in range(args.warmup + args.floor_samples):
                headers = {
                    "content-type": "application/json",
                    "webhook-id": str(uuid.uuid4()),
                    "webhook-timestamp": str(int(time.time())),
                    "accept-encoding": "identity",
                }
                started = time.perf_counter()
                row_id = await conn.fetchval(FLOOR_INSERT, payload)
                inserted = time.perf_counter()
                answer = await http.request("POST", url, headers=headers, body=body, timeout=15.0)
                posted = time.perf_counter()
                await conn.execute(FLOOR_UPDATE, row_id)
                done = time.perf_counter()
                if answer.status != 200:
                    raise BenchmarkFailed(f"floor: the fast receiver answered {answer.status}")
                if index >= args.warmup:
                    floor.total.append(done - started)
                    floor.insert.append(inserted - started)
                    floor.post.append(posted - inserted)
                    floor.update.append(done - posted)
        finally:
            await http.aclose()
    finally:
        await conn.close()
    print(f"  floor, {label}: {describe(floor.total)}", flush=True)
    return floor


# --- scenarios ------------------------------------------------------------------------------


def _report_samples(trips: RoundTrips) -> None:
    ok, late, bad = trips.count(SUCCEEDED), trips.count(TIMED_OUT), trips.count(FAILED)
    print(
        f"  {trips.label}: {len(trips.samples)} samples, {ok} succeeded, {late} timed out, {bad} failed; "
        f"succeeded {describe(trips.seconds(SUCCEEDED))}",
        flush=True,
    )
    if late:
        print(f"    timed-out replies: {describe(trips.seconds(TIMED_OUT))}", flush=True)
    for sample in [s for s in trips.samples if s.outcome != SUCCEEDED][:5]:
        print(f"    {sample.outcome} after {sample.seconds * 1000:.0f} ms: {sample.detail}", flush=True)
    for note in trips.notes:
        print(f"    {note}", flush=True)


async def idle_scenario(args: Any, mode: str, fast_url: str, work: Path, results: Results) -> None:
    label = f"{MODE_LABELS[mode]}, idle queue"
    async with scratch_database(args.database_url, "await_bench") as url:
        home = work / f"{mode}-idle"
        home.mkdir()
        env = process_env(url, home)
        with deadline(args.timeout, label):
            async with wordclaw(env, mode, home) as client:
                setup = await set_up(client, fast_url)
                warm = RoundTrips(f"{label}, warm-up", idle=True)
                for _ in range(args.warmup):
                    warm.samples.append(await awaited_round_trip(client, setup))
                if warm.count(SUCCEEDED) != args.warmup:
                    _report_samples(warm)
                trips = RoundTrips(label, idle=True)
                for _ in range(args.samples):
                    trips.samples.append(await awaited_round_trip(client, setup))
                _report_samples(trips)
                results.round_trips.append(trips)
                results.floors.append(await measure_floor(label, url, fast_url, setup.fast_payload, args))
            await report_worker_log(home)


async def backlog_scenario(args: Any, mode: str, fast_url: str, slow_url: str, work: Path, results: Results) -> None:
    label = f"{MODE_LABELS[mode]}, {args.backlog:,} backlog"
    async with scratch_database(args.database_url, "await_bench") as url:
        home = work / f"{mode}-backlog"
        home.mkdir()
        env = process_env(url, home)
        with deadline(args.timeout + args.backlog_seconds, label):
            async with wordclaw(env, None, home) as client:  # nothing delivers while the backlog is queued
                setup = await set_up(client, fast_url, slow_url)
            conn = await connect(url)
            try:
                enqueue_seconds = await enqueue_backlog(conn, setup, args.backlog)
                await conn.execute("ANALYZE")
                print(f"  enqueued {args.backlog:,} jobs to the slow target in {enqueue_seconds:.1f} s", flush=True)

                drain_started = time.perf_counter()
                async with wordclaw(env, mode, home) as client:  # the drain starts with the worker
                    # Warm the server with dry runs: an awaited call would wait behind the backlog.
                    for _ in range(args.warmup):
                        await call(
                            client,
                            "create_distribution_plan",
                            contentItemId=setup.item["id"],
                            targetIds=[setup.fast_target],
                            dryRun=True,
                        )
                    trips = RoundTrips(label, idle=False)
                    done_before, sampling_started = await backlog_done(conn, setup), time.perf_counter()
                    while (
                        len(trips.samples) < args.backlog_samples
                        and time.perf_counter() - sampling_started < args.backlog_seconds
                    ):
                        trips.samples.append(await awaited_round_trip(client, setup))
                    done_after, sampling_ended = await backlog_done(conn, setup), time.perf_counter()
                    rate = (done_after - done_before) / (sampling_ended - sampling_started)
                    left = args.backlog - done_after
                    eta = f"about {left / rate:.0f} s more at that rate" if rate else "no progress"
                    trips.notes.append(
                        f"backlog: {done_before:,} jobs done when sampling started "
                        f"({sampling_started - drain_started:.1f} s after the worker was spawned), {done_after:,} when "
                        f"it ended {sampling_ended - sampling_started:.0f} s later: {rate:.0f} jobs/s; "
                        f"{left:,} left, {eta}"
                    )
                    retried, failed_receipts = await conn.fetchrow(BACKLOG_RETRIES, uuid.UUID(setup.slow_target))
                    trips.notes.append(
                        f"backlog jobs attempted more than once: {retried}; unsuccessful backlog receipts: "
                        f"{failed_receipts}"
                    )
                    fast_jobs = await conn.fetch(JOBS_BY_STATUS, uuid.UUID(setup.fast_target))
                    trips.notes.append(
                        "the sampled plans' jobs after sampling: "
                        + ", ".join(f"{row['count']} {row['status']}" for row in fast_jobs)
                    )
                    _report_samples(trips)
                    results.round_trips.append(trips)
                    floor = await measure_floor(
                        f"{MODE_LABELS[mode]}, {args.backlog:,} backlog draining",
                        url,
                        fast_url,
                        setup.fast_payload,
                        args,
                    )
                    still_left = args.backlog - await backlog_done(conn, setup)
                    if still_left == 0:
                        print("    (the backlog had drained by the end of the floor measurement)", flush=True)
                    results.floors.append(floor)
                await report_worker_log(home)
            finally:
                await conn.close()


async def enqueue_backlog(conn: asyncpg.Connection, setup: Setup, jobs: int) -> float:
    """Plans of PLAN_SIZE jobs to the slow target, one transaction each, as the service writes them."""
    assert setup.slow_target is not None and setup.slow_payload is not None
    options = {"transformPolicy": TransformPolicy().model_dump(mode="json", by_alias=True)}
    item_id, target_id = uuid.UUID(setup.item["id"]), uuid.UUID(setup.slow_target)
    sizes = [PLAN_SIZE] * (jobs // PLAN_SIZE) + ([jobs % PLAN_SIZE] if jobs % PLAN_SIZE else [])
    started = time.perf_counter()
    for size in sizes:
        # Priority 0: the plan of nobody waiting, as the service gives it.
        await conn.execute(
            queries.CREATE_PLAN,
            *create_plan_arguments(
                item_id,
                setup.item["version"],
                [target_id] * size,
                [setup.slow_payload] * size,
                channel_type="webhook",
                max_attempts=MAX_ATTEMPTS,
                options=options,
            ),
        )
    return time.perf_counter() - started


BACKLOG_RETRIES = """
SELECT (SELECT count(*) FROM distribution_jobs WHERE target_id = $1 AND attempt > 1),
       (SELECT count(*) FROM distribution_receipts r JOIN distribution_jobs j ON j.id = r.job_id
        WHERE j.target_id = $1 AND NOT r.succeeded)
"""


JOBS_BY_STATUS = "SELECT status, count(*) FROM distribution_jobs WHERE target_id = $1 GROUP BY status ORDER BY 1"


async def backlog_done(conn: asyncpg.Connection, setup: Setup) -> int:
    assert setup.slow_target is not None
    return await conn.fetchval(
        "SELECT count(*) FROM distribution_jobs WHERE target_id = $1 AND status = 'succeeded'",
        uuid.UUID(setup.slow_target),
    )


# --- the run --------------------------------------------------------------------------------


async def machine(admin_url: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        server = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{os.cpu_count()} CPUs, Python {platform.python_version()}, PostgreSQL {server}, {when}; code in {CODE}"


async def run(args: argparse.Namespace) -> Results:
    """Every scenario; SIGINT or SIGTERM stops the run, after dropping its database and ending its processes."""
    results = Results()
    print(await machine(args.database_url), flush=True)
    await until_signalled(lambda: measure_all(args, results))
    return results


async def measure_all(args: argparse.Namespace, results: Results) -> None:
    with tempfile.TemporaryDirectory(prefix="wordclaw-await-bench-") as tmp:
        work = Path(tmp)
        async with (
            receiver_process("fast", 0.0, work / "fast-receiver.log") as fast_url,
            receiver_process("slow", args.slow_delay, work / "slow-receiver.log") as slow_url,
        ):
            print(f"fast receiver {fast_url}, slow receiver {slow_url} ({args.slow_delay:g} s per answer)", flush=True)
            for mode in args.modes:
                print(f"{MODE_LABELS[mode]}:", flush=True)
                await idle_scenario(args, mode, fast_url, work, results)
                if args.backlog:
                    await backlog_scenario(args, mode, fast_url, slow_url, work, results)


def report(results: Results) -> None:
    print()
    counts = f"{'n':>4} {'ok':>4} {'t/o':>4} {'fail':>4}"
    header = f"{'awaited round trip':<62} {counts} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    print(header)
    print("-" * len(header))
    for trips in results.round_trips:
        ok = [s * 1000 for s in trips.seconds(SUCCEEDED)]
        figures = f"{percentile(ok, 50):>8.1f} {percentile(ok, 99):>8.1f} {max(ok):>8.1f}" if ok else f"{'-':>8} " * 3
        print(
            f"{trips.label:<62} {len(trips.samples):>4} {len(ok):>4} {trips.count(TIMED_OUT):>4} "
            f"{trips.count(FAILED):>4} {figures}"
        )
    print("(p50/p99/max of the succeeded samples; t/o = awaitTimedOut, fail = failed plan or tool error)")
    for trips in results.round_trips:
        if trips.count(TIMED_OUT) or trips.count(FAILED):
            print(f"{trips.label}:")
            for outcome in (TIMED_OUT, FAILED):
                if trips.count(outcome):
                    print(f"    {outcome} replies: {describe(trips.seconds(outcome))}")
            for note in trips.notes:
                print(f"    {note}")
    print()
    header = f"{'floor: INSERT + POST + UPDATE':<62} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  parts p50 ms"
    print(header)
    print("-" * len(header))
    for floor in results.floors:
        ms = [s * 1000 for s in floor.total]
        parts = " / ".join(f"{statistics.median(part) * 1000:.2f}" for part in (floor.insert, floor.post, floor.update))
        print(
            f"{floor.label:<62} {len(ms):>4} {percentile(ms, 50):>8.1f} {percentile(ms, 99):>8.1f} "
            f"{max(ms):>8.1f}  {parts} (INSERT / POST / UPDATE)"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="timed round trips on the idle queue (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (default 10)")
    parser.add_argument(
        "--backlog", type=int, default=20000, help="jobs queued to the slow target (default 20000; 0 skips)"
    )
    parser.add_argument(
        "--backlog-samples", type=int, default=30, help="at most this many round trips behind the backlog (default 30)"
    )
    parser.add_argument(
        "--backlog-seconds",
        type=float,
        default=120.0,
        help="start no round trip behind the backlog after this many seconds (default 120)",
    )
    parser.add_argument("--slow-delay", type=float, default=0.2, help="the slow receiver's answer time (default 0.2 s)")
    parser.add_argument("--floor-samples", type=int, default=200, help="timed floor samples (default 200)")
    parser.add_argument(
        "--modes",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=[IN_SERVER, SEPARATE],
        help=f"comma-separated, of {IN_SERVER} and {SEPARATE} (default both)",
    )
    parser.add_argument("--database-url", default=DEFAULT_URL, help=f"an admin URL (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per scenario (default 600)")
    args = parser.parse_args(argv)
    if min(args.samples, args.backlog_samples, args.floor_samples) < 1 or min(args.warmup, args.backlog) < 0:
        parser.error("--samples, --backlog-samples and --floor-samples must be positive")
    if unknown := set(args.modes) - set(MODE_LABELS):
        parser.error(f"unknown --modes {sorted(unknown)}; use {IN_SERVER} and/or {SEPARATE}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = anyio.run(run, args)
    except BenchmarkFailed as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    report(results)
    # An idle queue should deliver every awaited plan; anything else is a finding, not noise.
    idle_misses = sum(len(t.samples) - t.count(SUCCEEDED) for t in results.round_trips if t.idle)
    if idle_misses:
        print(f"{idle_misses} round trip(s) on an idle queue did not succeed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
