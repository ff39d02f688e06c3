"""The MCP Inspector's CLI, a TypeScript SDK client, against the spawned stdio server.

The TypeScript SDK validates a result's ``structuredContent`` against the tool's output schema
even when ``isError`` is set (its ``Client.callTool``, SDK 1.x), so a tool error must come back
in a form that client shows: its JSON in the text, nothing in ``structuredContent``. The
Inspector is pinned in tests/inspector/package-lock.json and installed from it with ``npm ci``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.test_processes import BIN, external_database_env

INSPECTOR = Path(__file__).parent / "inspector"
pytestmark = pytest.mark.anyio

STAMP = INSPECTOR / "node_modules" / ".wordclaw-lock-sha256"


@pytest.fixture(scope="session")
def inspector() -> Iterator[Path]:
    """tests/inspector with the locked Inspector installed in its node_modules (gitignored).

    ``npm ci`` runs when node_modules was not installed from this very lock file, under a file
    lock so that two sessions on one checkout do not install over each other.
    """
    missing = [tool for tool in ("node", "npm", "npx") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not on PATH: the MCP Inspector needs node 20 or newer")
    wanted = hashlib.sha256((INSPECTOR / "package-lock.json").read_bytes()).hexdigest()
    with (INSPECTOR / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not STAMP.exists() or STAMP.read_text() != wanted:
            installed = subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline"],
                cwd=INSPECTOR,
                capture_output=True,
                text=True,
                timeout=600,
                stdin=subprocess.DEVNULL,
            )
            assert installed.returncode == 0, installed.stdout + installed.stderr
            STAMP.write_text(wanted)
    yield INSPECTOR


async def inspect(inspector: Path, env: dict[str, str], *arguments: str) -> tuple[int, str, str]:
    """``npx @modelcontextprotocol/inspector --cli wordclaw-mcp --method …``, as a user types it:
    its exit code, stdout and stderr."""
    command = ["npx", "--no-install", "@modelcontextprotocol/inspector", "--cli", str(BIN / "wordclaw-mcp")]
    with anyio.fail_after(90):
        done = await anyio.run_process([*command, *arguments], cwd=inspector, env=env, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_the_inspector_shows_a_tool_errors_code(inspector: Path, database_url: str, tmp_path: Path) -> None:
    env = external_database_env(database_url, tmp_path)
    missing = uuid.uuid4()
    code, stdout, stderr = await inspect(
        inspector, env, "--method", "tools/call", "--tool-name", "get_plan", "--tool-arg", f"planId={missing}"
    )
    assert "does not match the tool's output schema" not in stdout + stderr, stdout + stderr
    assert code == 0, stdout + stderr
    answer = json.loads(stdout)
    assert answer["isError"] is True and "structuredContent" not in answer, answer
    error = json.loads(answer["content"][0]["text"])["error"]
    assert error["code"] == "PLAN_NOT_FOUND" and str(missing) in error["message"], error


async def test_the_inspector_accepts_a_successful_result_against_its_output_schema(
    inspector: Path, database_url: str, tmp_path: Path
) -> None:
    env = external_database_env(database_url, tmp_path)
    code, stdout, stderr = await inspect(
        inspector,
        env,
        "--method",
        "tools/call",
        "--tool-name",
        "upsert_content_item",
        "--tool-arg",
        "title=From the Inspector",
        "--tool-arg",
        "body=Checked by its own schema validator.",
    )
    assert code == 0, stdout + stderr
    answer = json.loads(stdout)
    assert answer["isError"] is False and answer["structuredContent"]["version"] == 1, answer
