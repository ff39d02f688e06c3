"""The email channel against a real SMTP server (aiosmtpd) on 127.0.0.1: the message as a mail
client reads it, SMTP's 4xx and 5xx answers, authentication, and STARTTLS with a verified name."""

from __future__ import annotations

import email
import email.policy
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from queue_worker.adapters.email import EmailAdapter
from queue_worker.worker import Worker
from wordclaw_mcp.config import Settings
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import (
    ContentItem,
    CreateDistributionPlanInput,
    PlanRef,
    RegisterTargetInput,
    TransformPolicy,
    UpsertContentItemInput,
)
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

USER, PASSWORD = "mailer", "s3cret-pa55word"


@dataclass
class Mailbox:
    """An SMTP server's handler: keeps what it accepted; ``answer`` replaces its reply to DATA."""

    received: list[Any] = field(default_factory=list)
    answer: str | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.answer:
            return self.answer
        self.received.append(envelope)
        return "250 2.0.0 Message accepted"


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (USER.encode(), PASSWORD.encode())
    # handled=False: aiosmtpd answers a failure with 535 itself (True would mean we had).
    return AuthResult(success=ok, handled=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    controller = Controller(
        box, hostname="127.0.0.1", port=free_port(), authenticator=authenticate, auth_require_tls=False
    )
    controller.start()
    try:
        yield box, controller.port
    finally:
        controller.stop()


async def publish(service: DistributionService, port: int, **config: Any):
    item = await service.upsert_content_item(
        UpsertContentItemInput(
            title="Launch day", body="We **shipped** [it](https://example.com/it).", canonical_url="https://e.com/l"
        )
    )
    target = await service.register_target(
        RegisterTargetInput(
            name=f"mail-{item.id.hex[:6]}",
            channel_type="email",
            config={
                "host": "127.0.0.1",
                "port": port,
                "security": "none",
                "username": USER,
                "from": "news@example.com",
                "to": ["list@example.com"],
                "cc": ["editor@example.com"],
                "bcc": ["archive@example.com"],
                "replyTo": "editor@example.com",
                "listUnsubscribe": "mailto:leave@example.com",
                **config,
            },
            secrets={"password": PASSWORD},
        )
    )
    return await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id])
    )


async def test_an_item_arrives_as_multipart_alternative_with_its_headers(
    service: DistributionService, worker: Worker, mailbox: tuple[Mailbox, int]
) -> None:
    box, port = mailbox
    plan = await publish(service, port)
    await worker.run_once()

    [envelope] = box.received
    assert envelope.mail_from == "news@example.com"
    assert sorted(envelope.rcpt_tos) == ["archive@example.com", "editor@example.com", "list@example.com"]
    message = email.message_from_bytes(envelope.content, policy=email.policy.default)
    assert message.get_content_type() == "multipart/alternative"
    assert (message["Subject"], message["To"], message["Cc"], message["Reply-To"]) == (
        "Launch day",
        "list@example.com",
        "editor@example.com",
        "editor@example.com",
    )
    assert message["Bcc"] is None, "Bcc recipients must not be visible"
    assert message["List-Unsubscribe"] == "<mailto:leave@example.com>"
    plain = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert "We shipped it (https://example.com/it)." in plain and "https://e.com/l" in plain
    assert "<strong>shipped</strong>" in html and '<a href="https://e.com/l">' in html

    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.succeeded and message["Message-ID"] == f"<{job.id}@example.com>"
    assert receipt.raw_meta["messageId"] == message["Message-ID"]
    assert receipt.external_url == f"mid:{job.id}@example.com"


@pytest.mark.parametrize(
    ("answer", "job_status"),
    [("451 4.3.0 Mailbox busy, try later", "queued"), ("550 5.1.1 No such user here", "failed")],
)
async def test_a_4xx_is_retried_and_a_5xx_fails_the_job(
    service: DistributionService, worker: Worker, mailbox: tuple[Mailbox, int], answer: str, job_status: str
) -> None:
    box, port = mailbox
    box.answer = answer
    plan = await publish(service, port)
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == job_status
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.status_code == int(answer[:3]) and answer[4:] in receipt.error_message


async def test_a_wrong_password_fails_the_job_without_showing_it(
    service: DistributionService, worker: Worker, mailbox: tuple[Mailbox, int]
) -> None:
    box, port = mailbox
    plan = await publish(service, port, username="someone-else")
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == "failed" and box.received == []
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.status_code == 535 and PASSWORD not in receipt.model_dump_json()


async def test_starttls_verifies_the_servers_name(settings: Settings, tmp_path: Path) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    box = Mailbox()
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=server_context,
        require_starttls=True,
        authenticator=authenticate,
    )
    controller.start()
    try:
        async with Runtime.open(replace(settings, ca_bundle=str(ca_file))) as runtime:
            service, worker = DistributionService(runtime), Worker(runtime)
            good = await publish(service, controller.port, host="localhost", security="starttls")
            # The certificate names localhost, not 127.0.0.1: verifying the name must refuse it.
            bad = await publish(service, controller.port, security="starttls")
            await worker.run_once()
            assert (await service.get_plan(PlanRef(plan_id=good.id))).status == "succeeded"
            [job] = (await service.get_plan(PlanRef(plan_id=bad.id))).jobs
            assert job.status == "queued" and "certificate" in (job.last_error or "").lower()
    finally:
        controller.stop()
    assert len(box.received) == 1


@pytest.mark.parametrize(
    ("config", "mentions"),
    [
        ({"port": 70000}, "port"),
        ({"to": ["not-an-address"]}, "to"),
        ({"to": []}, "to"),
        ({"from": "news@example.com\r\nBcc: victim@example.com"}, "from"),
        ({"security": "ssl"}, "security"),
        ({"listUnsubscribe": "javascript:alert(1)"}, "listUnsubscribe"),
    ],
)
async def test_bad_email_targets_are_refused_at_registration(
    service: DistributionService, config: dict, mentions: str
) -> None:
    base = {"host": "127.0.0.1", "from": "news@example.com", "to": ["list@example.com"]}
    with pytest.raises(DistributionError) as refused:
        await service.register_target(
            RegisterTargetInput(name="bad-mail", channel_type="email", config={**base, **config})
        )
    assert refused.value.code == "INVALID_TARGET_CONFIG" and mentions in refused.value.message


def test_without_the_body_the_message_carries_the_summary_and_the_link() -> None:
    now = datetime.now(UTC)
    item = ContentItem(
        id=uuid4(),
        title="T",
        body="The whole, long body.",
        summary="Short.",
        canonical_url="https://e.com/p",
        metadata={},
        version=1,
        created_at=now,
        updated_at=now,
    )
    payload = EmailAdapter().transform(item, TransformPolicy(include_body=False))
    assert payload["text"] == "Short.\n\nhttps://e.com/p" and "whole" not in payload["html"]


async def test_a_mail_server_on_loopback_is_reached_under_the_policy_its_target_was_registered_with(
    service: DistributionService, settings: Settings, mailbox: tuple[Mailbox, int]
) -> None:
    # Registered where private addresses are allowed (the settings fixture's server), delivered by a
    # worker without WORDCLAW_ALLOW_PRIVATE_TARGETS: the target's recorded permission is what counts.
    box, port = mailbox
    allowed = await publish(service, port)
    async with Runtime.open(replace(settings, allow_private_targets=False)) as strict:
        assert await Worker(strict).run_once() == 1
        # The same mail server as a target recorded under the strict policy (rows from before the
        # policy was recorded read so) is refused before anything is sent.
        refused = await publish(service, port)
        await strict.pool.execute("UPDATE distribution_targets SET private_addresses_allowed = false")
        assert await Worker(strict).run_once() == 1
    assert (await service.get_plan(PlanRef(plan_id=allowed.id))).status == "succeeded"
    failed = await service.get_plan(PlanRef(plan_id=refused.id))
    assert failed.jobs[0].last_error.startswith("TARGET_ADDRESS_FORBIDDEN"), failed.jobs[0].last_error
    assert len(box.received) == 1
