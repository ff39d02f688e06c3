"""How the database is chosen: a URL, Docker through testcontainers, or the embedded server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import docker_engine_answers
from wordclaw_mcp.config import Settings
from wordclaw_mcp.database import SCHEMA_VERSION, apply_schema, connect, open_pool

pytestmark = pytest.mark.anyio


@pytest.mark.skipif(not docker_engine_answers(), reason="no Docker engine answers here, so testcontainers cannot run")
async def test_schema_applies_on_a_testcontainers_postgres() -> None:
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver=None) as container:
        conn = await connect(container.get_connection_url())
        try:
            assert await apply_schema(conn) == SCHEMA_VERSION
        finally:
            await conn.close()


def test_settings_choose_the_embedded_database_when_no_url_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORDCLAW_DATABASE_URL", raising=False)
    monkeypatch.setenv("WORDCLAW_HOME", "/srv/wordclaw")
    settings = Settings.from_env()
    assert settings.embedded and settings.home == Path("/srv/wordclaw")
    assert settings.worker_in_server, "embedded means one local user: the server delivers by default"

    monkeypatch.setenv("WORDCLAW_DATABASE_URL", "postgresql://db.internal/wordclaw")
    settings = Settings.from_env()
    assert not settings.embedded and not settings.worker_in_server
    monkeypatch.setenv("WORDCLAW_RUN_WORKER", "1")
    assert Settings.from_env().worker_in_server


def test_settings_read_the_workers_concurrency_and_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORDCLAW_WORKER_CONCURRENCY", "64")
    monkeypatch.setenv("WORDCLAW_WORKER_BATCH_SIZE", "32")
    settings = Settings.from_env()
    assert (settings.worker_concurrency, settings.worker_batch_size) == (64, 32)


async def test_open_pool_verifies_the_schema_of_a_configured_database(empty_database_url: str, tmp_path: Path) -> None:
    pool, url = await open_pool(Settings(database_url=empty_database_url, home=tmp_path))
    try:
        assert url == empty_database_url
        assert await pool.fetchval("SELECT max(version) FROM schema_version") == SCHEMA_VERSION
    finally:
        await pool.close()
