"""``wordclaw`` (operator commands) and ``wordclaw-mcp`` (the MCP server)."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import sys
from dataclasses import replace
from uuid import UUID

import anyio
import asyncpg

from . import __version__, cli_access
from .access import AccessService, key_required
from .config import Settings
from .database import apply_schema, create_pool_for, resolve_url
from .errors import DistributionError
from .runtime import worker_component

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def add_process_options(parser: argparse.ArgumentParser, *, log_level: str) -> None:
    """``--log-level`` (one of LOG_LEVELS, in any case; argparse refuses another with exit code 2)
    and ``--version``, for the long-running commands."""
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default=log_level, help=f"default {log_level}"
    )
    add_version(parser)


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def configure_logging(level: str = "INFO") -> None:
    # stdout carries the MCP protocol over stdio: everything human goes to stderr.
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def event_loop_options() -> dict[str, bool]:
    """anyio's asyncio options: uvloop wherever it is installed (it is a dependency, except on Windows).

    Measured on the worker and the stdio server (docs/benchmarks.md), the standard loop's own
    bookkeeping was a large share of each delivery's and each call's CPU time.
    """
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def database_refused(command: str, exc: asyncpg.PostgresError) -> DistributionError:
    return DistributionError(
        "DATABASE_REFUSED",
        f"The database refused `wordclaw {command}` ({type(exc).__name__}, SQLSTATE {exc.sqlstate}).",
        "Run it again: every command is safe to repeat. If it keeps failing, a long transaction may hold the "
        "rows it needs (pg_stat_activity shows it).",
    )


def report_failure(prog: str, exc: DistributionError) -> int:
    print(f"{prog}: {exc.code}: {exc.message} {exc.remediation}", file=sys.stderr)
    return 2


async def upgrade(settings: Settings, *, force: bool = False) -> tuple[str, int]:
    url = await resolve_url(settings)
    pool = await create_pool_for(settings, url, max_size=1)
    try:
        async with pool.acquire() as conn:
            return url, await apply_schema(conn, force=force)
    finally:
        await pool.close()


async def redrive(settings: Settings, *, plan: UUID | None, target: UUID | None, job: UUID | None) -> int:
    from .runtime import Runtime
    from .service import DistributionService

    async with Runtime.open(settings) as runtime:
        service = DistributionService(runtime)
        return len(await service.redrive(job_ids=[job] if job else None, plan_id=plan, target_id=target))


async def list_workers(settings: Settings) -> list[str]:
    from .runtime import Runtime
    from .service import DistributionService

    async with Runtime.open(settings) as runtime:
        workers = await DistributionService(runtime).list_workers()
    if not workers:
        return ["no worker is running"]
    lines = ["name\thost\tpid\tconcurrency\tstarted\tlast heartbeat"]
    for worker in workers:
        fields = [worker["name"], worker["host"], worker["pid"], worker["concurrency"]]
        fields += [worker[at].isoformat(timespec="seconds") for at in ("started_at", "heartbeat_at")]
        lines.append("\t".join(map(str, fields)))
    return lines


async def rotate_secret_keys(settings: Settings, *, batch_size: int) -> str:
    """``wordclaw keys rotate``: every stored secret sealed again under the first key; the summary.

    A progress bar on stderr when it is a terminal, nothing per batch otherwise.
    """
    from .keys import rotate_keys
    from .runtime import Runtime

    async with Runtime.open(settings) as runtime:
        if not sys.stderr.isatty():
            return (await rotate_keys(runtime.pool, runtime.secrets, batch_size=batch_size)).summary()
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True))
        task = bar.add_task("resealing secrets", total=None)

        def show(done: int, total: int) -> None:
            bar.start()  # at the first batch: a refusal before it leaves no empty bar behind
            bar.update(task, completed=done, total=total)

        try:
            report = await rotate_keys(runtime.pool, runtime.secrets, batch_size=batch_size, progress=show)
        finally:
            bar.stop()
        return report.summary()


async def check_before_serving(settings: Settings) -> None:
    """What the server's start checks, said with one line before serving: the schema (as ``upgrade``),
    that this process's keys decrypt every stored secret, and that its agent key (if any) is valid."""
    from .database import open_pool
    from .keys import verify_stored_secrets
    from .secrets import SecretBox

    pool, _url = await open_pool(settings, max_size=1)
    try:
        await verify_stored_secrets(pool, SecretBox.from_settings(settings))
        if settings.agent_key:
            await AccessService(pool).authenticate(settings.agent_key)
    finally:
        await pool.close()


def mcp_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wordclaw-mcp", description="Serve the WordClaw MCP tools.")
    parser.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1", help="for streamable-http")
    parser.add_argument("--port", type=int, default=8765, help="for streamable-http")
    worker = parser.add_mutually_exclusive_group()
    worker.add_argument(
        "--with-worker",
        dest="run_worker",
        action="store_true",
        default=None,
        help="deliver from this process (default when the database is embedded)",
    )
    worker.add_argument(
        "--no-worker",
        dest="run_worker",
        action="store_false",
        help="leave delivery to separate wordclaw-worker processes",
    )
    add_process_options(parser, log_level="WARNING")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = Settings.from_env()
        if args.run_worker is not None:
            settings = replace(settings, run_worker=args.run_worker)
        if args.transport == "streamable-http" and settings.agent_key:
            # Over HTTP each request names its agent by its bearer key; a key in the environment
            # (say, from an env file every process shares) would act for no one, so it is not
            # checked, and a wrong or revoked one does not stop the server.
            print(
                "wordclaw-mcp: WORDCLAW_AGENT_KEY is not used over HTTP: every request authenticates with its "
                "own `Authorization: Bearer wck_…` header.",
                file=sys.stderr,
            )
            settings = replace(settings, agent_key=None)
        # Fail before serving, with one line, rather than from inside the protocol loop.
        anyio.run(check_before_serving, settings)
        if args.transport == "stdio" and not (settings.agent_key or settings.local_agent_allowed):
            raise key_required()
    except DistributionError as exc:
        return report_failure("wordclaw-mcp", exc)

    from .server import build_server

    server = build_server(settings, checked=True)  # by check_before_serving, above
    if args.transport == "stdio":
        anyio.run(server.run_stdio_async, backend_options=event_loop_options())
    else:
        # Every HTTP request is authenticated by its bearer key (wordclaw_mcp/bearer.py).
        # Imported here: it brings the MCP SDK's HTTP stack, which wordclaw-worker (importing this
        # module for its logging helpers) must not pay for at start-up.
        from .bearer import serve_http

        http = functools.partial(serve_http, server, settings, host=args.host, port=args.port)
        anyio.run(http, backend_options=event_loop_options())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wordclaw", description="WordClaw Distribution operator commands.")
    add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="database commands").add_subparsers(dest="db_command", required=True)
    upgrade_cmd = db.add_parser(
        "upgrade", help="verify the schema: schema.sql on a fresh database, the pending migrations on an older one"
    )
    upgrade_cmd.add_argument(
        "--force", action="store_true", help="apply schema.sql again even if the version matches (it is idempotent)"
    )
    retention = commands.add_parser("retention", help="retention commands").add_subparsers(
        dest="retention_command", required=True
    )
    prune_cmd = retention.add_parser(
        "prune",
        help="delete finished jobs with their receipts, the plans they leave empty, and events, "
        "once older than the WORDCLAW_RETAIN_*_DAYS ages",
    )
    prune_cmd.add_argument(
        "--batch-size", type=int, default=1000, help="rows each statement deletes at most (default 1000)"
    )
    jobs = commands.add_parser("jobs", help="job commands").add_subparsers(dest="jobs_command", required=True)
    redrive_cmd = jobs.add_parser(
        "redrive", help="drive failed jobs (the dead letters) again with a fresh attempt budget; receipts stay"
    )
    which = redrive_cmd.add_mutually_exclusive_group(required=True)
    which.add_argument("--plan", type=UUID, help="every failed job of this plan")
    which.add_argument("--target", type=UUID, help="every failed job of this target")
    which.add_argument("--job", type=UUID, help="this job")
    keys = commands.add_parser("keys", help="secret key commands").add_subparsers(dest="keys_command", required=True)
    keys_rotate_cmd = keys.add_parser(
        "rotate",
        help="seal every stored secret again under the first WORDCLAW_SECRET_KEYS key, so the others can be dropped",
    )
    keys_rotate_cmd.add_argument(
        "--batch-size", type=int, default=500, help="rows each transaction reseals at most (default 500)"
    )
    cli_access.add_parsers(commands)
    commands.add_parser("workers", help="list the running workers and their last heartbeat")
    commands.add_parser("demo", help="publish a content item to a local webhook through the MCP server")
    commands.add_parser("mcp", help="the MCP server (same as wordclaw-mcp)", add_help=False)
    commands.add_parser("worker", help="the worker daemon (same as wordclaw-worker)", add_help=False)
    args, rest = parser.parse_known_args(argv)

    if args.command == "mcp":
        return mcp_main(rest)
    if args.command == "worker":
        try:
            worker_main = worker_component("cli")
        except DistributionError as exc:
            return report_failure("wordclaw worker", exc)
        return worker_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "retention" and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    configure_logging("WARNING")
    try:
        if args.command == "demo":
            from .demo import run_demo

            return anyio.run(run_demo)
        if args.command == "jobs":
            count = anyio.run(lambda: redrive(Settings.from_env(), plan=args.plan, target=args.target, job=args.job))
            print(f"{count} failed job(s) queued again")
            return 0
        if args.command == "keys":
            if args.batch_size < 1:
                parser.error("--batch-size must be at least 1")
            print(anyio.run(lambda: rotate_secret_keys(Settings.from_env(), batch_size=args.batch_size)))
            return 0
        if args.command in ("agents", "entitlements"):
            for line in cli_access.run(args, Settings.from_env()):
                print(line)
            return 0
        if args.command == "workers":
            for line in anyio.run(lambda: list_workers(Settings.from_env())):
                print(line)
            return 0
        if args.command == "retention":
            from .retention import prune_once

            report = anyio.run(lambda: prune_once(Settings.from_env(), batch_size=args.batch_size))
            print(report.summary())
            return 0
        _url, version = anyio.run(lambda: upgrade(Settings.from_env(), force=args.force))
        where = "embedded database" if Settings.from_env().embedded else "database"
        print(f"{where} is at schema version {version}")
        return 0
    except DistributionError as exc:
        return report_failure("wordclaw", exc)
    except asyncpg.PostgresError as exc:
        # A lock or statement timeout, say, in a long batch command: safe to run again.
        return report_failure("wordclaw", database_refused(args.command, exc))


if __name__ == "__main__":
    sys.exit(main())
