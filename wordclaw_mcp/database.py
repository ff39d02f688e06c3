"""Connections, the embedded server, and bringing the schema up to date."""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from . import queries
from .config import Settings
from .errors import DatabaseUnavailable, SchemaTooNew

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "wordclaw"

# Lost connections, and the server shutting down or killing our backend (SQLSTATE class 57).
# asyncpg reports a kill that arrived while a connection sat idle in the pool as an
# InternalClientError on its next query.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
)



class _Transaction:
    """``conn.transaction()`` whose end, the COMMIT or the ROLLBACK, is not cut short by a cancellation.

    anyio's cancellation is level-triggered: a task cancelled inside a transaction (a tool call
    whose session ended, a worker task stopped) has every later await cancelled too, the
    ROLLBACK in asyncpg's ``__aexit__`` among them. The connection then went back to the pool
    with its transaction open, and the pool's reset logged "Resetting connection with an active
    transaction" before rolling it back itself. Shielded, the transaction ends as it should; the
    pool's client-side timeout still bounds it.
    """

    def __init__(self, inner: asyncpg.transaction.Transaction) -> None:
        self._inner = inner

    async def __aenter__(self) -> None:
        await self._inner.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        with anyio.CancelScope(shield=True):
            await self._inner.__aexit__(*exc_info)


def transaction(conn: asyncpg.Connection, **options: Any) -> _Transaction:
    """A transaction on ``conn`` (``Connection.transaction``'s options) that always ends: use it
    instead of ``conn.transaction()``."""
    return _Transaction(conn.transaction(**options))


# --- migrations -------------------------------------------------------------------------------
#
# schema.sql is the whole current model, applied to a fresh database. A database made by an
# earlier release is brought forward by wordclaw_mcp/migrations/NNNN_name.sql instead: every
# file numbered above the database's version, in order, in one transaction. The release's
# SCHEMA_VERSION is the highest number there; tests/test_schema.py proves that upgrading from
# every earlier version gives the same catalog as schema.sql.

MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The migration files themselves are wrong: a packaging or authoring bug, not a database state."""


@dataclass(frozen=True)
class Migration:
    version: int
    filename: str
    sql: str


def migrations_folder() -> Traversable:
    """The packaged migrations: wordclaw_mcp/migrations, in a wheel and in a source checkout alike."""
    return resources.files("wordclaw_mcp").joinpath("migrations")


def load_migrations(folder: Traversable | Path | None = None) -> list[Migration]:
    """The migrations in ``folder`` (default: the packaged ones), in order, numbered 1..N without gaps."""
    folder = migrations_folder() if folder is None else folder
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql") or not entry.is_file():
            continue
        match = MIGRATION_FILE.match(entry.name)
        if match is None:
            raise MigrationError(f"{entry.name}: a migration file is named NNNN_lowercase_name.sql")
        version = int(match["version"])
        if version in found:
            raise MigrationError(f"{found[version].filename} and {entry.name} have the same number")
        found[version] = Migration(version, entry.name, entry.read_text(encoding="utf-8"))
    versions = sorted(found)
    if not versions or versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migrations in {folder} must be numbered from 0001 without gaps; found {versions}")
    return [found[version] for version in versions]


# The release's schema version: its highest migration. A database newer than this is refused.
SCHEMA_VERSION = load_migrations()[-1].version

# The client-side limit on each statement of the schema transaction. The pool's command_timeout
# is for ordinary statements; a long migration, or waiting for another process's, may take far
# longer. asyncpg cannot switch the limit off per call, so this is a day.
SCHEMA_STATEMENT_TIMEOUT = 24 * 3600.0


def schema_sql() -> str:
    packaged = resources.files("wordclaw_mcp").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # A source checkout or editable install: the file sits at the repository root.
    return (Path(__file__).resolve().parent.parent / "schema.sql").read_text(encoding="utf-8")


async def apply_schema(
    conn: asyncpg.Connection, *, force: bool = False, migrations: Sequence[Migration] | None = None
) -> int:
    """Bring the schema up to date and return its version (the release's SCHEMA_VERSION).

    - A fresh database (no schema_version table) gets schema.sql, recorded at SCHEMA_VERSION.
    - A database at version k gets migrations k+1..SCHEMA_VERSION in order, each recorded.
    - A newer database is refused with SchemaTooNew.
    - ``force`` applies schema.sql again afterwards; every statement in it is idempotent.

    Everything runs in one transaction under an advisory lock, so processes starting together
    apply it once, and a failing migration leaves the database at the version it was.
    ``migrations`` replaces the packaged migrations (for tests).
    """
    chain = load_migrations() if migrations is None else sorted(migrations, key=lambda migration: migration.version)
    release = chain[-1].version
    async with transaction(conn):
        # Before the lock: waiting for another process's migration must not time out either.
        await conn.execute(queries.SCHEMA_LIFT_TIMEOUTS, timeout=SCHEMA_STATEMENT_TIMEOUT)
        await conn.execute(queries.SCHEMA_LOCK, timeout=SCHEMA_STATEMENT_TIMEOUT)
        found = 0
        if await conn.fetchval(queries.SCHEMA_TABLE_EXISTS):
            found = await conn.fetchval(queries.SCHEMA_VERSION)
        if found > release:
            raise SchemaTooNew(found, release)
        if found == 0:
            log.info("applying schema.sql to a fresh database (release at version %s)", release)
            await conn.execute(schema_sql(), timeout=SCHEMA_STATEMENT_TIMEOUT)
            await conn.execute(queries.RECORD_SCHEMA_VERSION, release)
            return release
        for migration in chain:
            if migration.version > found:
                log.info("applying migration %s (database at version %s)", migration.filename, found)
                await conn.execute(migration.sql, timeout=SCHEMA_STATEMENT_TIMEOUT)
                await conn.execute(queries.RECORD_SCHEMA_VERSION, migration.version)
        if force:
            log.info("applying schema.sql again (forced)")
            await conn.execute(schema_sql(), timeout=SCHEMA_STATEMENT_TIMEOUT)
    return release


# --- connections ------------------------------------------------------------------------------

# A transaction left open by a client that went quiet holds its locks until this ends it.
IDLE_IN_TRANSACTION_TIMEOUT = 60.0


def _milliseconds(seconds: float) -> str:
    """A duration setting for PostgreSQL; 0 or less switches the limit off."""
    return "0" if seconds <= 0 else str(max(1, round(seconds * 1000)))


def command_timeout_for(statement_timeout: float) -> float | None:
    """asyncpg's client-side limit: a little above the server's, so the server's error comes first.

    Only the client can end a wait on a server that never answers (a half-open connection).
    """
    if statement_timeout <= 0:
        return None
    return statement_timeout + max(1.0, statement_timeout * 0.1)


def connection_options(
    *,
    statement_timeout: float = Settings.statement_timeout,
    lock_timeout: float = Settings.lock_timeout,
    idle_in_transaction_timeout: float = IDLE_IN_TRANSACTION_TIMEOUT,
) -> dict[str, Any]:
    """Keyword arguments for asyncpg.connect / create_pool.

    The settings travel in the start-up packet, so they are the session's defaults: the pool's
    RESET ALL on release returns to them instead of dropping them, as it would a SET.
    """
    return {
        "command_timeout": command_timeout_for(statement_timeout),
        "server_settings": {
            "statement_timeout": _milliseconds(statement_timeout),
            "lock_timeout": _milliseconds(lock_timeout),
            "idle_in_transaction_session_timeout": _milliseconds(idle_in_transaction_timeout),
            # PostgreSQL's default, set so a server configured otherwise cannot change it. The
            # worker runs a few statements thousands of times a minute, and planning them afresh
            # each time cost a fifth of its database time at batch 10. A cached generic plan
            # cannot see how long the arrays are or how big the limits, so each of those
            # statements is written to reach jobs by id whatever plan is chosen; a test keeps
            # their generic plans index-driven (test_schema.py).
            "plan_cache_mode": "auto",
        },
    }


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a released connection gets instead of asyncpg's RESET ALL, UNLISTEN *, CLOSE ALL and unlock.

    That reset is a round trip, and server work, on every release: two per worker batch. Our
    statements leave no session state behind (settings are SET LOCAL, advisory locks are
    transaction locks, LISTEN has its own connection), and asyncpg still rolls back an open
    transaction before calling this.
    """


async def connect(
    url: str,
    *,
    statement_timeout: float = Settings.statement_timeout,
    lock_timeout: float = Settings.lock_timeout,
    idle_in_transaction_timeout: float = IDLE_IN_TRANSACTION_TIMEOUT,
    **kwargs: Any,
) -> asyncpg.Connection:
    """A single connection with the same codecs and limits as the pool (for LISTEN and tests)."""
    options = connection_options(
        statement_timeout=statement_timeout,
        lock_timeout=lock_timeout,
        idle_in_transaction_timeout=idle_in_transaction_timeout,
    )
    options["server_settings"].update(kwargs.pop("server_settings", None) or {})
    conn = await asyncpg.connect(url, **(options | kwargs))
    await _init_connection(conn)
    return conn


async def create_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    statement_timeout: float = Settings.statement_timeout,
    lock_timeout: float = Settings.lock_timeout,
    idle_in_transaction_timeout: float = IDLE_IN_TRANSACTION_TIMEOUT,
    clock_offset: float = 0.0,
) -> asyncpg.Pool:
    """A pool whose connections carry the codecs and the statement, lock and idle limits.

    A statement waiting on a lock longer than ``lock_timeout`` fails with LockNotAvailableError;
    one running longer than ``statement_timeout`` with QueryCanceledError; one whose server
    stops answering with TimeoutError a little later (the client-side command_timeout).
    0 switches a limit off.
    """
    options = connection_options(
        statement_timeout=statement_timeout,
        lock_timeout=lock_timeout,
        idle_in_transaction_timeout=idle_in_transaction_timeout,
    )
    if clock_offset:
        # Read by wordclaw_now(): the clock the duplicate, idempotency and expiry rules use.
        options["server_settings"]["wordclaw.clock_offset"] = repr(float(clock_offset))
    try:
        return await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, init=_init_connection, reset=_keep_session, **options
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(str(exc)) from exc


async def create_pool_for(settings: Settings, url: str, *, max_size: int = 10) -> asyncpg.Pool:
    """create_pool with the limits (and the test clock) from ``settings``."""
    return await create_pool(
        url,
        max_size=max_size,
        statement_timeout=settings.statement_timeout,
        lock_timeout=settings.lock_timeout,
        clock_offset=settings.clock_offset,
    )


@dataclass
class EmbeddedServer:
    """The pgserver-managed PostgreSQL in ``WORDCLAW_HOME/pgdata``.

    pgserver shares one postmaster between processes: it records each process holding a
    handle under an inter-process lock, and the last one to exit stops the server.
    """

    handle: Any

    @classmethod
    async def start(cls, home: Path) -> EmbeddedServer:
        def _start() -> Any:
            home.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
                import pgserver

                return pgserver.get_server(home / "pgdata", cleanup_mode="stop")

        try:
            handle = await anyio.to_thread.run_sync(_start)
        except Exception as exc:
            raise DatabaseUnavailable(f"the embedded PostgreSQL in {home} did not start: {exc}") from exc
        server = cls(handle)
        await server._ensure_database()
        return server

    def url(self, database: str = EMBEDDED_DATABASE) -> str:
        return self.handle.get_uri(database)

    async def _ensure_database(self) -> None:
        try:
            conn = await asyncpg.connect(self.url("postgres"))
            try:
                # CREATE DATABASE cannot run in a transaction, so a session lock serialises the
                # check-then-create of processes starting together.
                await conn.execute(queries.EMBEDDED_CREATE_LOCK)
                if not await conn.fetchval(queries.DATABASE_EXISTS, EMBEDDED_DATABASE):
                    await conn.execute(queries.create_database(EMBEDDED_DATABASE))
            finally:
                await conn.close()  # closing the session releases the lock
        except (OSError, asyncpg.PostgresError) as exc:
            raise DatabaseUnavailable(f"the embedded database could not be prepared: {exc}") from exc


async def resolve_url(settings: Settings) -> str:
    """The database URL for these settings, starting the embedded server when none is set."""
    if settings.database_url:
        return settings.database_url
    server = await EmbeddedServer.start(settings.home)
    return server.url()


async def open_pool(settings: Settings, *, max_size: int = 10) -> tuple[asyncpg.Pool, str]:
    """A pool on an up-to-date schema, plus the URL it connects to."""
    url = await resolve_url(settings)
    pool = await create_pool_for(settings, url, max_size=max_size)
    try:
        async with pool.acquire() as conn:
            await apply_schema(conn)
    except BaseException:
        await pool.close()
        raise
    return pool, url
