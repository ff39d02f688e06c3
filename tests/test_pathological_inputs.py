"""No input stalls the server (issue 15, part 5): through the SDK's real client over streamable
HTTP, every tool given the largest inputs it takes, each built to be pathological for a parser on
its path (twitter-text's URL finder, markdown-it, BeautifulSoup and markdownify, the cuts, the
Bluesky facets), answers within 2 s, with its result or a coded error; and meanwhile another
tenant's calls on the same server are each answered within 200 ms.

The heavy agent (tests/pathological_agent.py) runs in a process of its own, as another agent
would: parsing its multi-megabyte answers is its own work, not the server's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.helpers import call, serving_http
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import RegisterTargetInput
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

HEAVY_SECONDS = 2.0  # the most any call may take (issue 15)
LIGHT_SECONDS = 0.2  # the most another session's call may take meanwhile
ROOT = Path(__file__).resolve().parent.parent


async def test_no_input_stalls_the_server_nor_another_tenants_calls(
    service: DistributionService, settings: Settings
) -> None:
    _heavy, heavy_key = await service.access.create_agent(
        "heavy", ["content:write", "targets:admin", "distribution:write", "distribution:read"], "heavy"
    )
    light_agent, light_key = await service.access.create_agent("light", ["distribution:read"], "light")
    await service.register_target(
        RegisterTargetInput(name="own", channel_type="webhook", config={"url": "http://127.0.0.1:9/own"}),
        agent=light_agent,
    )
    light_seconds: list[float] = []
    async with (
        serving_http(settings) as url,
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {light_key}"}, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http)) as light,
    ):
        await call(light, "list_targets")  # the session is open and warm
        async with await anyio.open_process(
            [sys.executable, "-m", "tests.pathological_agent", url, heavy_key],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ) as heavy:
            assert heavy.stdout is not None
            output = bytearray()

            async def read() -> None:
                async for chunk in heavy.stdout:
                    output.extend(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                while heavy.returncode is None:
                    started = time.monotonic()
                    listed = await call(light, "list_targets")
                    light_seconds.append(time.monotonic() - started)
                    assert [target["name"] for target in listed["targets"]] == ["own"]
                    with anyio.move_on_after(0.02):  # a pause between calls, as an agent makes them
                        await heavy.wait()
            assert heavy.returncode == 0, output.decode()

    answers = [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]
    outcomes = {answer["label"]: answer["outcome"] for answer in answers}
    assert len(outcomes) == 23, output.decode()
    assert "INTERNAL_ERROR" not in outcomes.values(), outcomes
    slow = [answer for answer in answers if answer["seconds"] > HEAVY_SECONDS]
    assert not slow, f"calls over {HEAVY_SECONDS} s: {slow}"
    assert len(light_seconds) > 20
    assert max(light_seconds) < LIGHT_SECONDS, f"another tenant waited {max(light_seconds):.3f} s"
    assert outcomes["upsert html nested"] == outcomes["upsert metadata nested 200 deep"] == "VALIDATION_ERROR"
    assert outcomes["upsert the longest title, summary and metadata"] == outcomes["upsert html dots"] == "ok"
    assert outcomes["dry run dots, maxLength 50"] == "ok"
    assert outcomes["dry run dots, whole body"] == "ok"
    assert outcomes["dry run brackets, maxLength 50"] in {"ok", "CONTENT_TOO_COMPLEX"}
