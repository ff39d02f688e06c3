"""Channels from other packages: the example Slack adapter in examples/wordclaw-slack, found through the
``wordclaw.adapters`` entry points as pip would install it, and delivering to a Slack-shaped
receiver on 127.0.0.1. And the rule that lets such packages exist: the core never imports the
worker package that holds the built-in adapters."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from queue_worker.worker import Worker
from wordclaw_mcp.adapters import ENTRY_POINT_GROUP, AdapterRegistry
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import CreateDistributionPlanInput, PlanRef, RegisterTargetInput, UpsertContentItemInput
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "wordclaw-slack"


def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, entry_points: dict[str, str]) -> None:
    """What ``pip install`` leaves for importlib.metadata to find: a dist-info with the entry points.

    Written here rather than installed, because a test cannot reach a package index; the
    lookup that finds it is the one an installed package goes through.
    """
    dist_info = tmp_path / f"{name.replace('-', '_')}-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{key} = {value}" for key, value in entry_points.items())]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def slack_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example package, with the entry points its own pyproject.toml declares."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    install(tmp_path / "site", monkeypatch, project["name"], project["entry-points"][ENTRY_POINT_GROUP])
    monkeypatch.syspath_prepend(str(EXAMPLE))


@pytest.fixture
async def slack_service(slack_installed: None, settings: Settings):
    async with Runtime.open(settings) as runtime:
        yield DistributionService(runtime), Worker(runtime)


async def plan_to_slack(service: DistributionService, url: str):
    item = await service.upsert_content_item(
        UpsertContentItemInput(
            title="Launch", body="The *whole* story.", summary="We shipped.", canonical_url="https://example.com/l"
        )
    )
    target = await service.register_target(
        RegisterTargetInput(name="team-news", channel_type="slack", secrets={"webhookUrl": url})
    )
    return await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id])
    )


async def test_an_installed_package_adds_a_channel_that_delivers_with_no_change_to_the_core(
    slack_service, receiver: WebhookReceiver
) -> None:
    service, worker = slack_service
    receiver.behaviour.body, receiver.behaviour.headers = b"ok", {"content-type": "text/plain"}
    url = receiver.url + "/services/T000/B000/" + "x" * 24
    plan = await plan_to_slack(service, url)
    assert await worker.run_once() == 1

    done = await service.get_plan(PlanRef(plan_id=plan.id))
    assert done.status == "succeeded"
    [request] = receiver.requests
    assert json.loads(request.body) == {"text": "*Launch*\nWe shipped.\n<https://example.com/l>"}
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.succeeded and receipt.status_code == 200
    # The webhook URL is the credential: never shown with the target.
    listed = (await service.list_targets()).targets
    assert [t.has_secrets for t in listed] == [True] and url not in json.dumps([t.config for t in listed])


@pytest.mark.parametrize(
    ("status", "body", "headers", "job_status", "target_active"),
    [
        (404, b"no_service", {}, "failed", True),
        (400, b"invalid_payload", {}, "failed", True),
        (410, b"channel_is_archived", {}, "failed", False),
        (429, b"rate_limited", {"retry-after": "30"}, "queued", True),
    ],
)
async def test_slacks_answers_become_the_right_outcome(
    slack_service,
    receiver: WebhookReceiver,
    status: int,
    body: bytes,
    headers: dict,
    job_status: str,
    target_active: bool,
) -> None:
    service, worker = slack_service
    receiver.behaviour.status, receiver.behaviour.body = status, body
    receiver.behaviour.headers = {"content-type": "text/plain", **headers}
    plan = await plan_to_slack(service, receiver.url + "/services/T1/B1/secret")
    await worker.run_once()

    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == job_status
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.status_code == status and body.decode() in receipt.error_message
    [target] = (await service.list_targets()).targets
    assert target.active is target_active
    if status == 429:
        assert target.suspended_until is not None and job.attempt == 1


async def test_an_entry_point_that_fails_to_load_or_is_no_adapter_is_skipped_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "broken_channels.py").write_text("import no_such_module\n")
    (tmp_path / "odd_channels.py").write_text("class NotAnAdapter:\n    channel_type = 'odd'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    install(
        tmp_path / "site",
        monkeypatch,
        "wordclaw-broken",
        {"broken": "broken_channels:Adapter", "odd": "odd_channels:NotAnAdapter"},
    )
    with caplog.at_level(logging.ERROR):
        registry = AdapterRegistry()
    try:
        assert "broken" not in registry.channel_types and "odd" not in registry.channel_types
        assert "webhook" in registry.channel_types
        assert "adapter entry point broken could not be loaded" in caplog.text
        assert "adapter entry point odd (odd_channels:NotAnAdapter) is not an Adapter" in caplog.text
    finally:
        await registry.aclose()


def test_the_core_never_imports_the_worker_package() -> None:
    # It finds adapters, and starts the worker, through entry points; see wordclaw_mcp/adapters.py.
    offenders = []
    for path in sorted((ROOT / "wordclaw_mcp").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno}" for name in names if name.split(".")[0] == "queue_worker"
            ]
    assert offenders == []


def test_the_worker_starts_without_the_mcp_sdk() -> None:
    # The SDK's types take about half a second to import and 20 MB to hold: a worker has no use
    # for them, and its start-up is measured (docs/benchmarks.md).
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, queue_worker.cli; print(sorted({m.split('.')[0] for m in sys.modules}))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "'mcp'" not in loaded and "'mcp_types'" not in loaded, loaded
