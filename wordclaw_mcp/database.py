"""Connections, the embedded server, and applying schema.sql."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from . import queries
from .config import Settings
from .errors import DatabaseUnavailable, SchemaTooNew

log = logging.getLogger(__name__)

# Bump together with a change to schema.sql; a database newer than this is refused.
SCHEMA_VERSION = 1

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


def schema_sql() -> str:
    packaged = resources.files("wordclaw_mcp").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # A source checkout or editable install: the file sits at the repository root.
    return (Path(__file__).resolve().parent.parent / "schema.sql").read_text(encoding="utf-8")


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    # asyncpg prepares every statement, and after five runs PostgreSQL may switch to a generic
    # plan that assumes unnest() yields 10 rows. For RECORD_ATTEMPTS that plan drives the update
    # from the running-leases index and rescans the batch per running job: quadratic, 8 s
    # instead of 0.3 s for 5,000 outcomes. Our statements take arrays and limits whose real
    # sizes the planner must see, and planning costs far less than the commit that follows.
    await conn.execute(queries.SESSION_SETTINGS)


async def connect(url: str, **kwargs: Any) -> asyncpg.Connection:
    """A single connection with the same codecs as the pool (for LISTEN and tests)."""
    conn = await asyncpg.connect(url, **kwargs)
    await _init_connection(conn)
    return conn


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    try:
        return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_connection)
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(str(exc)) from exc


async def apply_schema(conn: asyncpg.Connection, *, force: bool = False) -> int:
    """Verify the schema, applying schema.sql when the database is behind. Returns the version.

    Runs under an advisory lock, so a server and a worker starting together apply it once.
    """
    async with conn.transaction():
        await conn.execute(queries.SCHEMA_LOCK)
        found = 0
        if await conn.fetchval(queries.SCHEMA_TABLE_EXISTS):
            found = await conn.fetchval(queries.SCHEMA_VERSION)
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(found, SCHEMA_VERSION)
        if found < SCHEMA_VERSION or force:
            log.info("applying schema.sql (database at version %s, release at %s)", found, SCHEMA_VERSION)
            await conn.execute(schema_sql())
            await conn.execute(queries.RECORD_SCHEMA_VERSION, SCHEMA_VERSION)
    return SCHEMA_VERSION


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
    pool = await create_pool(url, max_size=max_size)
    async with pool.acquire() as conn:
        await apply_schema(conn)
    return pool, url
