"""WORDCLAW_ALLOW_PRIVATE_TARGETS: read by the server that registers a target, kept with the target,
and honoured by every worker that delivers it, with or without the setting of its own."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from uuid import UUID

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from mcp import Client

from queue_worker.adapters import AdapterOptions, AdapterRegistry, DeliveryTarget
from queue_worker.worker import Worker
from tests.helpers import call_error, publish
from wordclaw_mcp import netguard
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import (
    CreateDistributionPlanInput,
    Plan,
    PlanRef,
    RegisterTargetInput,
    UpsertContentItemInput,
)
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.server import build_server
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

PAYLOAD = {"type": "content.distributed", "data": {"title": "Hello"}}


@pytest.fixture
async def strict_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """A process on the same database without WORDCLAW_ALLOW_PRIVATE_TARGETS (the ``settings``
    fixture's processes have it, as their peers listen on 127.0.0.1)."""
    async with Runtime.open(replace(settings, allow_private_targets=False)) as runtime:
        yield runtime


def answering(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str]) -> None:
    """DNS as ``answers`` says, for names the tests make up (no DNS server here can be told what to
    answer); the dict may change between calls, as a real zone can."""

    async def resolve(host: str, port: int) -> list[netguard.IPAddress]:
        return [ipaddress.ip_address(answers.get(host, host))]

    monkeypatch.setattr(netguard, "resolve", resolve)


async def test_a_loopback_webhook_registered_where_allowed_is_delivered_by_a_worker_without_the_setting(
    service: DistributionService, strict_runtime: Runtime, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    plan, [target_id] = await publish(service, [receiver.url])
    recorded = "SELECT private_addresses_allowed FROM distribution_targets WHERE id = $1"
    assert await db.fetchval(recorded, target_id) is True

    assert await Worker(strict_runtime).run_once() == 1
    done = await service.get_plan(PlanRef(plan_id=plan.id))
    assert (done.status, done.jobs[0].last_error) == ("succeeded", None)
    assert len(receiver.requests) == 1


async def test_a_server_without_the_setting_refuses_a_loopback_webhook_and_names_the_setting(
    settings: Settings, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    async with Client(build_server(replace(settings, allow_private_targets=False))) as client:
        error = await call_error(
            client, "register_target", name="local", channelType="webhook", config={"url": receiver.url}
        )
    assert error["code"] == "TARGET_ADDRESS_FORBIDDEN" and "127.0.0.1" in error["message"]
    assert "WORDCLAW_ALLOW_PRIVATE_TARGETS=1" in error["remediation"]
    assert "server that registers the target" in error["remediation"]
    assert await db.fetchval("SELECT count(*) FROM distribution_targets") == 0


async def test_a_strict_target_never_reaches_a_private_address_through_a_permissive_targets_connection(
    service: DistributionService,
    strict_runtime: Runtime,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Both targets name the same host and port, so they would share a pooled connection. The strict
    # one was registered while its name answered with a public address; it now answers loopback.
    answers = {"hooks.example": "93.184.215.14"}
    answering(monkeypatch, answers)
    url = receiver.url.replace("127.0.0.1", "hooks.example")
    strict = await register(DistributionService(strict_runtime), url)
    permissive = await register(service, url)
    answers["hooks.example"] = "127.0.0.1"
    item = await service.upsert_content_item(UpsertContentItemInput(title="Title", body="Body"))

    worker = Worker(strict_runtime)
    first = await plan(service, item.id, permissive)
    assert await worker.run_once() == 1  # delivered, and its connection kept alive
    assert (await service.get_plan(PlanRef(plan_id=first.id))).status == "succeeded"
    second = await plan(service, item.id, strict)
    assert await worker.run_once() == 1
    refused = await service.get_plan(PlanRef(plan_id=second.id))
    assert refused.status == "failed"
    assert refused.jobs[0].last_error.startswith("TARGET_ADDRESS_FORBIDDEN"), refused.jobs[0].last_error
    assert len(receiver.requests) == 1


async def register(service: DistributionService, url: str) -> UUID:
    request = RegisterTargetInput(name=f"hook-{uuid.uuid4().hex[:8]}", channel_type="webhook", config={"url": url})
    return (await service.register_target(request)).id


async def plan(service: DistributionService, item_id: UUID, target_id: UUID) -> Plan:
    return await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item_id, target_ids=[target_id])
    )


@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policies=st.lists(st.booleans(), min_size=1, max_size=8))
def test_whatever_came_before_a_strict_target_is_refused_and_a_permissive_one_delivered(
    policies: list[bool], receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deliveries in any order, one after another, through one strict process's adapters: the
    permissive targets' kept-alive connections never carry a strict target's request."""
    answering(monkeypatch, {"hooks.example": "127.0.0.1"})
    url = receiver.url.replace("127.0.0.1", "hooks.example")
    before = len(receiver.requests)

    async def deliver_all() -> list[tuple[bool, str | None]]:
        registry = AdapterRegistry(AdapterOptions(allow_private_targets=False, timeout=5.0))
        webhook = registry.get("webhook")
        outcomes = []
        try:
            for allowed in policies:
                target = DeliveryTarget(
                    id=uuid.uuid4(), name="hook", config={"url": url}, private_addresses_allowed=allowed
                )
                result = await webhook.deliver(PAYLOAD, target, message_id=uuid.uuid4().hex)
                outcomes.append((result.succeeded, result.error))
        finally:
            await registry.aclose()
        return outcomes

    outcomes = anyio.run(deliver_all)
    for allowed, (succeeded, error) in zip(policies, outcomes, strict=True):
        assert succeeded is allowed, (policies, outcomes)
        assert allowed or (error or "").startswith("TARGET_ADDRESS_FORBIDDEN"), (policies, outcomes)
    assert len(receiver.requests) - before == sum(policies)
