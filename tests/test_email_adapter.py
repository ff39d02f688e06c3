"""The email channel against a real SMTP server (aiosmtpd) on 127.0.0.1: the message as a mail
client reads it, SMTP's 4xx and 5xx answers, authentication, and STARTTLS with a verified name."""

from __future__ import annotations

import asyncio
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
    """An SMTP server's handler: keeps what it accepted; ``answer`` replaces its reply to DATA, and
    ``refuse`` its reply to RCPT TO for the addresses it names (as a server does an unknown mailbox)."""

    received: list[Any] = field(default_factory=list)
    answer: str | None = None
    refuse: dict[str, str] = field(default_factory=dict)
    # Take the message, then wait this long before saying so: a slow server whose client gives up
    # with the message already accepted.
    confirm_after: float = 0.0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.answer:
            return self.answer
        self.received.append(envelope)
        await asyncio.sleep(self.confirm_after)
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


async def test_a_message_whose_acceptance_went_unanswered_is_not_sent_again(
    settings: Settings, mailbox: tuple[Mailbox, int]
) -> None:
    """SMTP keeps no idempotency key: once the end of DATA went out, the server may have taken the
    message, and every recipient would get it twice. The job ends DELIVERY_OUTCOME_UNKNOWN."""
    box, port = mailbox
    box.confirm_after = 3.0
    async with Runtime.open(replace(settings, delivery_timeout=0.5)) as runtime:
        service, worker = DistributionService(runtime), Worker(runtime)
        plan = await publish(service, port)
        await worker.run_once()
        [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
        assert job.status == "failed" and job.last_error.startswith("DELIVERY_OUTCOME_UNKNOWN"), job
        async with runtime.pool.acquire() as db:
            await db.execute("UPDATE distribution_jobs SET next_attempt_at = now() - interval '1 day'")
        await worker.run_once()
    assert len(box.received) == 1


async def test_a_wrong_password_fails_the_job_without_showing_it(
    service: DistributionService, worker: Worker, mailbox: tuple[Mailbox, int]
) -> None:
    box, port = mailbox
    plan = await publish(service, port, username="someone-else")
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == "failed" and box.received == []
    assert (job.attempt, job.last_error.split(":")[0]) == (1, "SMTP_LOGIN_REFUSED")
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.status_code == 535 and PASSWORD not in receipt.model_dump_json()


def localhost_certificate(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context whose certificate names localhost (not 127.0.0.1), and the CA file to trust."""
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    return server_context, ca_file


async def only_the_certificates_name_gets_the_message(
    settings: Settings, ca_file: Path, controller: Controller, box: Mailbox, security: str
) -> None:
    """Mail to ``localhost`` (the certificate's name) arrives; mail to 127.0.0.1 fails at once, with
    SMTP_CERTIFICATE_INVALID: no retry verifies a certificate that did not verify."""
    controller.start()
    try:
        async with Runtime.open(replace(settings, ca_bundle=str(ca_file))) as runtime:
            service, worker = DistributionService(runtime), Worker(runtime)
            good = await publish(service, controller.port, host="localhost", security=security)
            bad = await publish(service, controller.port, security=security)
            await worker.run_once()
            assert (await service.get_plan(PlanRef(plan_id=good.id))).status == "succeeded"
            [job] = (await service.get_plan(PlanRef(plan_id=bad.id))).jobs
            assert (job.status, job.attempt) == ("failed", 1), job
            assert job.last_error.startswith("SMTP_CERTIFICATE_INVALID:") and "WORDCLAW_CA_BUNDLE" in job.last_error
    finally:
        controller.stop()
    assert len(box.received) == 1


async def test_starttls_verifies_the_servers_name(settings: Settings, tmp_path: Path) -> None:
    server_context, ca_file = localhost_certificate(tmp_path)
    box = Mailbox()
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=server_context,
        require_starttls=True,
        authenticator=authenticate,
    )
    await only_the_certificates_name_gets_the_message(settings, ca_file, controller, box, "starttls")


async def test_tls_from_the_start_verifies_the_servers_name(settings: Settings, tmp_path: Path) -> None:
    server_context, ca_file = localhost_certificate(tmp_path)
    box = Mailbox()
    # aiosmtpd counts only STARTTLS as encryption when it decides whether to offer AUTH; this
    # connection is encrypted from its first byte, so AUTH is allowed without it.
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=free_port(),
        ssl_context=server_context,
        authenticator=authenticate,
        auth_require_tls=False,
    )
    await only_the_certificates_name_gets_the_message(settings, ca_file, controller, box, "tls")


# --- what the server refuses ----------------------------------------------------------------------


async def job_after_one_attempt(service: DistributionService, worker: Worker, plan_id: Any) -> Any:
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=plan_id))).jobs
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan_id))).receipts
    return job, receipt


async def test_a_server_that_offers_no_starttls_fails_a_starttls_target_at_once(
    service: DistributionService, worker: Worker, mailbox: tuple[Mailbox, int]
) -> None:
    box, port = mailbox  # no TLS context: the server's EHLO does not offer STARTTLS
    plan = await publish(service, port, security="starttls")
    job, receipt = await job_after_one_attempt(service, worker, plan.id)
    assert (job.status, job.attempt) == ("failed", 1) and box.received == []
    assert job.last_error.startswith("SMTP_TLS_UNAVAILABLE:") and "'tls'" in job.last_error
    assert receipt.error_message == job.last_error


@pytest.mark.parametrize(
    ("answer", "status", "code"),
    [
        ("535 5.7.8 Authentication credentials invalid", "failed", 535),
        ("534 5.7.9 Authentication mechanism is too weak", "failed", 534),
        ("454 4.7.0 Temporary authentication failure", "queued", 454),
    ],
)
async def test_a_login_the_server_refuses_fails_at_once_unless_it_says_try_later(
    service: DistributionService, worker: Worker, answer: str, status: str, code: int
) -> None:
    def refuse(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        return AuthResult(success=False, handled=False, message=answer)

    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port(), authenticator=refuse, auth_require_tls=False)
    controller.start()
    try:
        plan = await publish(service, controller.port)
        job, receipt = await job_after_one_attempt(service, worker, plan.id)
    finally:
        controller.stop()
    assert (job.status, job.attempt, receipt.status_code) == (status, 1, code) and box.received == []
    assert job.last_error.startswith("SMTP_LOGIN_REFUSED:") and answer[4:] in job.last_error
    assert PASSWORD not in receipt.model_dump_json()


async def test_a_server_that_offers_no_login_without_tls_fails_a_target_with_a_username_at_once(
    service: DistributionService, worker: Worker
) -> None:
    box = Mailbox()
    # aiosmtpd's default, as most servers: AUTH is offered only once the connection is encrypted.
    controller = Controller(box, hostname="127.0.0.1", port=free_port(), authenticator=authenticate)
    controller.start()
    try:
        plan = await publish(service, controller.port, security="none")
        job, _receipt = await job_after_one_attempt(service, worker, plan.id)
    finally:
        controller.stop()
    assert (job.status, job.attempt) == ("failed", 1) and box.received == []
    assert job.last_error.startswith("SMTP_LOGIN_REFUSED:") and "starttls" in job.last_error


@pytest.mark.parametrize(
    ("refuse", "status"),
    [
        ({"archive@example.com": "550 5.1.1 No such user"}, "succeeded"),
        ({"list@example.com": "452 4.2.2 Mailbox full", "editor@example.com": "550 5.1.1 No such user"}, "succeeded"),
        (
            {
                "list@example.com": "550 5.1.1 No such user",
                "editor@example.com": "450 4.2.1 Try again later",
                "archive@example.com": "550 5.7.1 Relaying denied",
            },
            "failed",
        ),
        (
            {
                "list@example.com": "450 4.2.1 Try again later",
                "editor@example.com": "451 4.3.0 Local error",
                "archive@example.com": "452 4.2.2 Mailbox full",
            },
            "queued",
        ),
    ],
    ids=["one-refused", "two-refused", "all-refused", "all-deferred"],
)
async def test_recipients_the_server_refuses_are_in_the_receipt(
    service: DistributionService, worker: Worker, mailbox: tuple[Mailbox, int], refuse: dict[str, str], status: str
) -> None:
    box, port = mailbox
    box.refuse = refuse
    plan = await publish(service, port)
    job, receipt = await job_after_one_attempt(service, worker, plan.id)
    assert job.status == status
    assert receipt.raw_meta["refusedRecipients"] == refuse
    accepted = {"list@example.com", "editor@example.com", "archive@example.com"} - set(refuse)
    if accepted:
        [envelope] = box.received
        assert set(envelope.rcpt_tos) == accepted and receipt.succeeded and receipt.error_message is None
    else:
        assert box.received == [] and job.last_error.startswith("SMTP_RECIPIENTS_REFUSED:")


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
