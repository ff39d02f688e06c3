"""Spawned processes, as users run them: wordclaw-mcp over stdio, wordclaw-worker, wordclaw demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import asyncpg
import pytest
from anyio.abc import Process
from cryptography.fernet import Fernet
from mcp import Client, StdioServerParameters

from tests.helpers import call, eventually
from wordclaw_mcp.receiver import WebhookReceiver

pytestmark = pytest.mark.anyio

BIN = Path(sys.executable).parent


def clean_env(**settings: str) -> dict[str, str]:
    """The caller's environment without any WORDCLAW_* setting, plus ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WORDCLAW_")}
    return {**env, **settings}


def external_database_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    """Settings for processes sharing a given database, delivering to loopback receivers."""
    return clean_env(
        WORDCLAW_DATABASE_URL=database_url,
        WORDCLAW_ALLOW_PRIVATE_TARGETS="1",
        WORDCLAW_SECRET_KEYS=Fernet.generate_key().decode(),
        WORDCLAW_HOME=str(tmp_path / "home"),
        # A session without a key acts as the local agent; test_stdio_server_… gives one a key.
        WORDCLAW_LOCAL_AGENT="1",
    )


@asynccontextmanager
async def worker_process(env: dict[str, str], log: Path) -> AsyncIterator[Process]:
    with log.open("wb") as sink:
        process = await anyio.open_process([str(BIN / "wordclaw-worker")], env=env, stdout=sink, stderr=sink)
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def stop(process: Process, log: Path) -> int:
    process.send_signal(signal.SIGTERM)
    with anyio.fail_after(30):
        code = await process.wait()
    text = await anyio.Path(log).read_text()
    assert "stopped" in text, text
    return code


async def publish_over_stdio(env: dict[str, str], receiver: WebhookReceiver) -> dict:
    params = StdioServerParameters(command=str(BIN / "wordclaw-mcp"), args=["--no-worker"], env=env)
    async with Client(params) as client:
        item = await call(client, "upsert_content_item", title="Over stdio", body="Delivered by another process.")
        target = await call(
            client, "register_target", name="stdio-hook", channelType="webhook", config={"url": receiver.url}
        )
        return await call(
            client, "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"]], awaitDelivery=True
        )


async def test_stdio_server_and_a_separate_worker_deliver_a_webhook(
    database_url: str, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    env = external_database_env(database_url, tmp_path) | {"WORDCLAW_LOCAL_AGENT": "0"}
    # The agent's key, made as an operator makes it, and given to the session as a user gives it.
    made = await anyio.run_process(
        [str(BIN / "wordclaw"), "agents", "create", "stdio-bot", "--scopes", "admin"], env=env
    )
    [key] = [line.removeprefix("key: ") for line in made.stdout.decode().splitlines() if line.startswith("key: ")]
    log = tmp_path / "worker.log"
    async with worker_process(env, log) as worker:
        plan = await publish_over_stdio(env | {"WORDCLAW_AGENT_KEY": key}, receiver)
        assert await stop(worker, log) == 0
    assert plan["status"] == "succeeded", plan
    # uvloop is a dependency wherever it builds; the daemon runs on it (docs/benchmarks.md says why).
    assert "event loop uvloop" in log.read_text()
    [receipt] = plan["receipts"]
    assert (receipt["succeeded"], receipt["statusCode"], receipt["attempt"]) == (True, 200, 1)
    assert len(receiver.requests) == 1


async def test_a_killed_workers_job_is_rescued_and_delivered_by_another(
    database_url: str, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    env = external_database_env(database_url, tmp_path)
    receiver.behaviour.hang = True
    params = StdioServerParameters(command=str(BIN / "wordclaw-mcp"), args=["--no-worker"], env=env)
    async with Client(params) as client:
        item = await call(client, "upsert_content_item", title="Rescued", body="b")
        target = await call(client, "register_target", name="hook", channelType="webhook", config={"url": receiver.url})
        plan = await call(client, "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"]])

        async with worker_process(env, tmp_path / "doomed.log") as doomed:
            await anyio.to_thread.run_sync(receiver.wait_for, 1)  # the attempt is in flight
            doomed.kill()  # SIGKILL: no chance to record anything
            await doomed.wait()
        assert (await call(client, "get_plan", planId=plan["id"]))["jobs"][0]["status"] == "running"

        # The lease would run out after two minutes; end it now rather than wait.
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 second'")
        finally:
            await conn.close()
        receiver.behaviour.hang = False
        log = tmp_path / "rescuer.log"
        async with worker_process(env, log) as rescuer:
            await anyio.to_thread.run_sync(receiver.wait_for, 2)
            done = await eventually(lambda: _final(client, plan["id"]))
            assert await stop(rescuer, log) == 0
        receipts = (await call(client, "get_receipts", planId=plan["id"]))["receipts"]
    assert done["status"] == "succeeded"
    assert done["jobs"][0]["attempt"] == 2
    assert [(r["attempt"], r["succeeded"]) for r in receipts] == [(1, False), (2, True)]
    assert "stopped responding" in receipts[0]["errorMessage"]


async def _final(client: Client, plan_id: str) -> dict | None:
    plan = await call(client, "get_plan", planId=plan_id)
    return plan if plan["status"] not in {"queued", "running"} else None


def embedded_postgres_running(home: Path) -> bool:
    import psutil

    data = str(home / "pgdata")
    return any(
        process.info["name"] == "postgres" and data in " ".join(process.info["cmdline"] or ())
        for process in psutil.process_iter(["name", "cmdline"])
    )


async def test_on_the_embedded_default_a_server_and_worker_share_one_postgres(
    receiver: WebhookReceiver, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = clean_env(WORDCLAW_HOME=str(home), WORDCLAW_ALLOW_PRIVATE_TARGETS="1")
    log = tmp_path / "worker.log"
    # Started together: both race to initialise the same data directory.
    async with worker_process(env, log) as worker:
        plan = await publish_over_stdio(env, receiver)
        assert embedded_postgres_running(home), "the worker still holds the embedded server"
        assert await stop(worker, log) == 0
    assert plan["status"] == "succeeded", (plan, log.read_text())
    assert (home / "secret.key").stat().st_mode & 0o077 == 0
    # The last process to leave stops the server it shared.
    assert not embedded_postgres_running(home)


def test_the_readme_demo_command_works_on_the_embedded_default(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "wordclaw"), "demo"],
        env=clean_env(WORDCLAW_HOME=str(tmp_path / "home")),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": succeeded" in result.stdout
    assert "signature verified" in result.stdout
    assert '"succeeded": true' in result.stdout


def test_startup_failure_is_one_coded_line_not_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "wordclaw-mcp")],
        env=clean_env(WORDCLAW_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none"),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("wordclaw-mcp: DATABASE_UNAVAILABLE:"), result.stderr
    assert "Traceback" not in result.stderr
