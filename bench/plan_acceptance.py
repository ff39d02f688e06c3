"""Plan acceptance over stdio: ``create_distribution_plan`` calls per second, against a read-only tool's floor.

    .venv/bin/python bench/plan_acceptance.py [--seconds S | --calls N] [--callers C] [--profile DIR]
        [--database-url URL]

An agent's view: the SDK's ``mcp.Client`` spawns ``wordclaw-mcp --no-worker`` over stdio, on a
database of its own (created here, dropped at the end), with 5 webhook targets and one content
item. Each plan names all 5 targets, with ``awaitDelivery`` false, so a call is accepted once
its plan and its 5 jobs are committed. No worker runs and nothing is delivered.

Three shapes, each timed for ``--seconds`` (or ``--calls`` calls) after an untimed warm-up:

- 1 caller: calls one after another on one session;
- C callers, one session: C calls in flight at once on the same session (``--callers``, default 8);
- C sessions: C server processes, one caller each.

The floor, in the same run and the same shapes: the cheapest read-only tool. Every read-only
tool the server lists, that needs no argument but a plan id, is timed with 1 caller (on the
plan made in set-up); the fastest is the floor, and is timed again in the other shapes. Plans/s
is reported as a % of the floor of its shape.

Every reply is checked (a plan must come back ``queued`` with 5 jobs), and at the end the number
of plans in the database must equal the number of calls that succeeded. Any failed call fails
the benchmark.

Needs a PostgreSQL server it may create databases on.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from cryptography.fernet import Fernet
from mcp import Client, StdioServerParameters
from scratch import BenchmarkFailed, deadline, scratch_database, setup_call, until_signalled  # bench/scratch.py

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BIN = Path(sys.executable).parent
CREATE = "create_distribution_plan"
TARGETS = 5
# How long the client waits for any one reply.
REPLY_TIMEOUT = 60.0
call = functools.partial(setup_call, reply_seconds=REPLY_TIMEOUT)
# Untimed calls per caller before each measurement: the first calls of a shape pay for
# prepared statements, pool connections and the SDK's caches.
WARMUP = 10


# --- results --------------------------------------------------------------------------------


@dataclass
class Calls:
    """One tool timed in one shape."""

    shape: str
    tool: str
    succeeded: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.succeeded / self.seconds if self.seconds else 0.0


@dataclass
class Run:
    measurements: list[Calls] = field(default_factory=list)
    floors: dict[str, str] = field(default_factory=dict)  # shape -> the floor tool
    plans_created: int = 0  # every successful create, warm-ups and set-up included
    plans_in_database: int = 0
    jobs_in_database: int = 0


@dataclass(frozen=True)
class Call:
    tool: str
    arguments: dict[str, Any]


# --- the server -----------------------------------------------------------------------------


def server_env(database_url: str, home: Path) -> dict[str, str]:
    """This environment without any WORDCLAW_* setting, plus the run's own."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("WORDCLAW_")}
    return {
        **env,
        "WORDCLAW_DATABASE_URL": database_url,
        "WORDCLAW_HOME": str(home),
        "WORDCLAW_SECRET_KEYS": Fernet.generate_key().decode(),
        "WORDCLAW_ALLOW_PRIVATE_TARGETS": "1",  # the targets name a loopback port nobody serves
        "WORDCLAW_LOCAL_AGENT": "1",
    }


@asynccontextmanager
async def sessions(env: dict[str, str], count: int, profile: Path | None = None) -> AsyncIterator[list[Client]]:
    """``count`` ``wordclaw-mcp --no-worker`` processes over stdio, one client session each.

    With ``profile``, each runs under py-spy, which writes its samples (collapsed stacks) there
    when the server exits.
    """
    async with AsyncExitStack() as stack:
        clients = []
        for _ in range(count):
            command = [str(BIN / "wordclaw-mcp"), "--no-worker"]
            if profile:
                output = profile / f"server-{time.monotonic_ns()}.collapsed"
                command = [str(BIN / "py-spy"), "record", "--rate", "250", "--format", "raw", "-o", str(output), "--"]
                command += [str(BIN / "wordclaw-mcp"), "--no-worker"]
            params = StdioServerParameters(command=command[0], args=command[1:], env=env)
            clients.append(await stack.enter_async_context(Client(params)))
        yield clients


@dataclass(frozen=True)
class Setup:
    create: Call
    plan_id: str


async def set_up(client: Client) -> Setup:
    """One item, TARGETS webhook targets, and one plan for the read-only tools to read."""
    item = await call(
        client,
        "upsert_content_item",
        title="Plan acceptance",
        body="# Plan acceptance\n\nA short body, *rendered* per target.",
        summary="One item, planned many times.",
        canonicalUrl="https://example.com/plan-acceptance",
    )
    target_ids = []
    for index in range(TARGETS):
        # Port 9 (discard) on loopback: registration checks the URL, and no worker ever sends to it.
        config = {"url": f"http://127.0.0.1:9/hooks/{index}"}
        target = await call(client, "register_target", name=f"target-{index}", channelType="webhook", config=config)
        target_ids.append(target["id"])
    # The same item and targets over and over: the duplicate rule, waived, is still checked.
    create = Call(
        CREATE, {"contentItemId": item["id"], "targetIds": target_ids, "awaitDelivery": False, "allowDuplicate": True}
    )
    plan = await call(client, CREATE, **create.arguments)
    return Setup(create, plan["id"])


async def floor_candidates(client: Client, plan_id: str) -> list[Call]:
    """The read-only tools the server lists that need nothing but, at most, a plan id."""
    listing = await client.list_tools()
    names = {tool.name for tool in listing.tools}
    if CREATE not in names:
        raise BenchmarkFailed(f"the server lists no {CREATE} tool: {sorted(names)}")
    candidates = []
    for tool in listing.tools:
        if not (tool.annotations and tool.annotations.read_only_hint):
            continue
        required = set(tool.input_schema.get("required") or [])
        if not required:
            candidates.append(Call(tool.name, {}))
        elif required == {"planId"}:
            candidates.append(Call(tool.name, {"planId": plan_id}))
    if not candidates:
        raise BenchmarkFailed(f"no read-only tool to serve as the floor among {sorted(names)}")
    return candidates


# --- timing ---------------------------------------------------------------------------------


def check_reply(tool: str, result: Any) -> str | None:
    """Why a reply does not count as a success, or None if it does."""
    if result.is_error:
        return result.content[0].text[:300] if result.content else "an error with no content"
    if tool != CREATE:
        return None
    plan = result.structured_content or {}
    if plan.get("id") and plan.get("status") == "queued" and len(plan.get("jobs") or []) == TARGETS:
        return None
    return f"unexpected plan: status {plan.get('status')!r}, {len(plan.get('jobs') or [])} jobs"


async def time_calls(shape: str, clients: list[Client], callers: int, what: Call, budget: Budget) -> Calls:
    """``callers`` callers on each client, each calling ``what`` one call after another, until the budget is spent."""
    calls = Calls(shape, what.tool)
    issued = 0

    async def caller(client: Client, started: float) -> None:
        nonlocal issued
        while not budget.spent(issued, time.perf_counter() - started):
            issued += 1
            try:
                result = await client.call_tool(what.tool, what.arguments, read_timeout_seconds=REPLY_TIMEOUT)
                problem = check_reply(what.tool, result)
            except Exception as exc:  # no reply, or a protocol error: a failed call, reported
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                calls.succeeded += 1
            else:
                calls.failed += 1
                calls.errors.append(problem)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for client in clients:
            for _ in range(callers):
                tg.start_soon(caller, client, started)
    # Calls in flight when the budget ran out are waited for, and counted, so the time runs to the last reply.
    calls.seconds = time.perf_counter() - started
    return calls


@dataclass(frozen=True)
class Budget:
    """When a caller stops starting calls: after ``calls`` calls in all, or after ``seconds``."""

    seconds: float | None = None
    calls: int | None = None

    def spent(self, issued: int, elapsed: float) -> bool:
        if self.calls is not None:
            return issued >= self.calls
        assert self.seconds is not None
        return elapsed >= self.seconds


async def measure(
    run: Run, shape: str, clients: list[Client], callers: int, what: Call, budget: Budget, limit: float
) -> Calls:
    """Warm up, then time; every successful create is a plan the database must hold at the end."""
    with deadline(limit, f"{shape}, {what.tool}"):
        warm = await time_calls(shape, clients, callers, what, Budget(calls=WARMUP * callers * len(clients)))
        timed = await time_calls(shape, clients, callers, what, budget)
    if what.tool == CREATE:
        run.plans_created += warm.succeeded + timed.succeeded
    timed.failed += warm.failed
    timed.errors += warm.errors
    run.measurements.append(timed)
    print(f"  {shape:<28} {what.tool:<26} {timed.per_second:9,.1f} calls/s ({timed.failed} failed)", flush=True)
    return timed


# --- the run --------------------------------------------------------------------------------


async def measure_all(args: argparse.Namespace, run: Run) -> None:
    budget = Budget(calls=args.calls) if args.calls else Budget(seconds=args.seconds)
    limit = args.timeout
    callers = args.callers
    async with scratch_database(args.database_url, "plan_bench") as database_url:
        with tempfile.TemporaryDirectory(prefix="wordclaw-plan-bench-") as home:
            env = server_env(database_url, Path(home))
            async with sessions(env, 1, args.profile) as [client]:
                setup = await set_up(client)
                run.plans_created += 1
                candidates = await floor_candidates(client, setup.plan_id)

                one = "1 caller"
                floors = [await measure(run, one, [client], 1, what, budget, limit) for what in candidates]
                floor = candidates[floors.index(max(floors, key=lambda timed: timed.per_second))]
                await measure(run, one, [client], 1, setup.create, budget, limit)
                run.floors[one] = floor.tool

                shared = f"{callers} callers, 1 session"
                await measure(run, shared, [client], callers, floor, budget, limit)
                await measure(run, shared, [client], callers, setup.create, budget, limit)
                run.floors[shared] = floor.tool

            if callers > 1:
                apart = f"{callers} sessions"
                async with sessions(env, callers, args.profile) as clients:
                    await measure(run, apart, clients, 1, floor, budget, limit)
                    await measure(run, apart, clients, 1, setup.create, budget, limit)
                run.floors[apart] = floor.tool

            await count_rows(database_url, run)


async def count_rows(database_url: str, run: Run) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        run.plans_in_database = await conn.fetchval("SELECT count(*) FROM distribution_plans")
        run.jobs_in_database = await conn.fetchval("SELECT count(*) FROM distribution_jobs")
    finally:
        await conn.close()


def verify(run: Run) -> None:
    failed = [m for m in run.measurements if m.failed]
    if failed:
        first = failed[0]
        raise BenchmarkFailed(
            f"{sum(m.failed for m in failed)} call(s) failed; the first, in {first.shape} with {first.tool}: "
            f"{first.errors[0]}"
        )
    if run.plans_in_database != run.plans_created or run.jobs_in_database != TARGETS * run.plans_created:
        raise BenchmarkFailed(
            f"{run.plans_created} plans were accepted, but the database holds {run.plans_in_database} plans "
            f"and {run.jobs_in_database} jobs (expected {TARGETS * run.plans_created})"
        )


async def main_async(args: argparse.Namespace) -> Run:
    """Every measurement; SIGINT or SIGTERM stops the run, after dropping its database and ending its processes."""
    run = Run()
    await until_signalled(lambda: measure_all(args, run))
    verify(run)
    return run


def report(run: Run) -> None:
    floor_rate = {
        m.shape: m.per_second for m in run.measurements if m.tool == run.floors.get(m.shape) and m.tool != CREATE
    }
    print()
    header = f"{'shape':<24} {'tool':<26} {'calls':>7} {'s':>7} {'calls/s':>9} {'% of floor':>11}"
    print(header)
    print("-" * len(header))
    for m in run.measurements:
        share = f"{100 * m.per_second / floor_rate[m.shape]:>10.0f}%" if floor_rate.get(m.shape) else f"{'-':>11}"
        tool = m.tool + (" (floor)" if m.tool == run.floors.get(m.shape) else "")
        print(f"{m.shape:<24} {tool:<26} {m.succeeded:>7} {m.seconds:>7.2f} {m.per_second:>9,.1f} {share}")
    print(f"(a plan names {TARGETS} targets; awaitDelivery false; warm-up calls not counted)")
    print()
    for m in run.measurements:
        if m.tool == CREATE:
            floor = floor_rate[m.shape]
            print(
                f"{m.shape}: {m.per_second:,.1f} plans/s, {100 * m.per_second / floor:.0f}% of "
                f"{run.floors[m.shape]} ({floor:,.1f} calls/s)"
            )
    print(
        f"plans accepted: {run.plans_created}; in the database: {run.plans_in_database} ({run.jobs_in_database} jobs)"
    )


def machine() -> str:
    load = " ".join(f"{figure:.2f}" for figure in os.getloadavg())
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC, {os.cpu_count()} cores, load {load}, "
        f"Python {platform.python_version()}, mcp {version('mcp')}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=10.0, help="time each measurement for S s (default 10)")
    budget.add_argument("--calls", type=int, help="or make N timed calls per measurement, shared by its callers")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers and sessions (default 8)")
    parser.add_argument("--profile", type=Path, help="run the servers under py-spy; write their samples here")
    parser.add_argument("--database-url", default=DEFAULT_URL, help=f"an admin URL (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per measurement (default 300)")
    args = parser.parse_args(argv)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.seconds <= 0 or (args.calls is not None and args.calls < 1) or args.callers < 1:
        parser.error("--seconds, --calls and --callers must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"before: {machine()}", flush=True)
    try:
        run = anyio.run(main_async, args)
    except BenchmarkFailed as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"after:  {machine()}", flush=True)
    report(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
