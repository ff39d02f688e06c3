"""Fixtures on real parts: a real PostgreSQL, a real HTTP receiver, the SDK's real MCP client.

The PostgreSQL server is, in order: WORDCLAW_TEST_DATABASE_URL; a Docker container through
testcontainers when a Docker engine answers; the embedded pgserver. Each test gets its own
database, cloned from a template that has schema.sql applied, so it starts clean and fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest
from cryptography.fernet import Fernet
from mcp import Client

from queue_worker.worker import Worker
from tests.fake_bluesky import FakeBluesky
from wordclaw_mcp import queries
from wordclaw_mcp.config import Settings
from wordclaw_mcp.database import EmbeddedServer, apply_schema, connect
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.server import build_server
from wordclaw_mcp.service import DistributionService


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A maintenance URL on a PostgreSQL server this session may create databases on."""
    if url := os.environ.get("WORDCLAW_TEST_DATABASE_URL"):
        yield url
        return
    if docker_engine_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    # Not under pytest's basetemp: a second pytest session started meanwhile deletes all but the
    # newest three of those, and with them this running server's data directory.
    home = Path(tempfile.mkdtemp(prefix="wordclaw-test-pg-"))
    server = anyio.run(EmbeddedServer.start, home)
    try:
        yield server.url("postgres")
    finally:
        server.handle.cleanup()
        shutil.rmtree(home, ignore_errors=True)


async def create_database(server_url: str, prefix: str, *, template: str | None = None) -> str:
    """A new database named ``prefix`` plus a random suffix; returns its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(queries.create_database(name, template=template))
    finally:
        await admin.close()
    return name


async def drop_database(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(queries.drop_database(name))
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def template_database(postgres_server_url: str) -> Iterator[str]:
    async def create() -> str:
        name = await create_database(postgres_server_url, "wordclaw_template")
        conn = await connect(with_database(postgres_server_url, name))
        try:
            await apply_schema(conn)
        finally:
            await conn.close()
        return name

    name = anyio.run(create)
    yield name
    anyio.run(drop_database, postgres_server_url, name)


@pytest.fixture
async def database_url(postgres_server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh database with the schema applied, dropped after the test."""
    name = await create_database(postgres_server_url, "wordclaw_test", template=template_database)
    yield with_database(postgres_server_url, name)
    await drop_database(postgres_server_url, name)


@pytest.fixture
async def empty_database_url(postgres_server_url: str) -> AsyncIterator[str]:
    """A fresh database with nothing in it, for schema tests."""
    name = await create_database(postgres_server_url, "wordclaw_empty")
    yield with_database(postgres_server_url, name)
    await drop_database(postgres_server_url, name)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        home=tmp_path / "home",
        secret_keys=(Fernet.generate_key().decode(),),
        # Every peer in these tests listens on 127.0.0.1, which only such deployments may reach.
        allow_private_targets=True,
        run_worker=False,
        # A session without a key acts as the local agent, as on the embedded default; the access
        # tests give keys of their own (tests/test_access.py).
        local_agent=True,
        poll_interval=0.2,
        delivery_timeout=5.0,
        shutdown_grace=2.0,
    )


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with Runtime.open(settings) as opened:
        yield opened


@pytest.fixture
def service(runtime: Runtime) -> DistributionService:
    return DistributionService(runtime)


@pytest.fixture
def worker(runtime: Runtime) -> Worker:
    return Worker(runtime)


@pytest.fixture
async def db(service: DistributionService) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection for asserting on stored rows."""
    async with service.pool.acquire() as conn:
        yield conn


@pytest.fixture
def pds() -> Iterator[FakeBluesky]:
    """A local Bluesky PDS (tests/fake_bluesky.py)."""
    with FakeBluesky() as fake:
        yield fake


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with ExitStack() as stack:
        yield stack.enter_context(WebhookReceiver())


@pytest.fixture
async def mcp_client(settings: Settings) -> AsyncIterator[Client]:
    """The SDK's in-process client on a server that runs its own worker."""
    async with Client(build_server(replace(settings, run_worker=True))) as client:
        yield client


@pytest.fixture
async def mcp_client_no_worker(settings: Settings) -> AsyncIterator[Client]:
    async with Client(build_server(settings)) as client:
        yield client
