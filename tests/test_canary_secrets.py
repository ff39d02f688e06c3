"""A canary secret on a target of every channel that takes secrets, followed everywhere it could leak.

The issue's requirement: "A canary secret registered on targets of every channel appears in no tool
result, error, receipt, event, log line or dry-run, and a ``pg_dump`` holds only ciphertext."

One random canary per run is built into every secret the test gives: a webhook's signing secret
(inside its base64 key), a webhook's extra header value and the token in its URL's query, a token in
a webhook URL's path (Discord's layout), an SMTP password, Mastodon and X access tokens and a Bluesky
app password. Everything then goes through the SDK's real MCP client, as an agent would use it,
against local peers (fakes that answer like the real services), some of which fail, and some of which
echo the secret they were sent back in their answer, as careless servers do. Afterwards the canary
must be in no tool result, no stored row, no log record and no ``pg_dump``, and every stored secret
must be a Fernet token.

RSS and Atom take no secrets (their adapters have no ``secrets_model``), and nothing in their config
is one: ``path``, ``title``, ``link`` and ``description`` are all published in the feed itself. So
they carry no canary; they are in the plans only so that the fan-out spans every channel, and an
attempt to give an RSS target secrets anyway is one of the errors checked.

The second test has a webhook endpoint echo a secret in a form WordClaw's scrubbing
(``wordclaw_mcp/redaction.py``) does not recognise: JSON with ``/`` escaped as ``\\/`` (PHP's
``json_encode`` default), and the secret straddling the point where the stored answer is cut
(``RESPONSE_BODY_LIMIT``). Either way the canary must not be stored or shown.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography.fernet import Fernet
from mcp import Client
from standardwebhooks import Webhook

from queue_worker.adapters.webhook import RESPONSE_BODY_LIMIT
from tests.fake_bluesky import FakeBluesky
from tests.fake_mastodon import FakeMastodon
from tests.fake_x import FakeX
from tests.helpers import eventually
from tests.test_schema import matching_pg_dump
from wordclaw_mcp.adapters import adapter_classes
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import FINAL_PLAN_STATUSES
from wordclaw_mcp.receiver import WebhookReceiver

pytestmark = pytest.mark.anyio

# The channels whose adapters take secrets; the test fails if one is added and not covered here.
SECRET_CHANNELS = {"webhook", "email", "mastodon", "bluesky", "x"}
# Loggers of the local peers, not of WordClaw: aiosmtpd logs the AUTH answer it is told to give,
# which here echoes the password on purpose. What WordClaw logs is checked; what a peer does is not.
PEER_LOGGERS = ("mail.log",)
SMTP_USER = "mailer"
# The targets whose peers refuse the delivery (401, 535 or 400), every other one succeeds.
REFUSED = {"webhook-path-token", "email-refused", "mastodon-refused", "x", "bluesky-refused"}


def canary_forms(canary: str) -> set[str]:
    """The canary as text, and as it would read if it were stored or shown encoded: the hex in which
    pg_dump and to_jsonb write a bytea, and base64 (standard and URL-safe) at any of its three
    alignments inside a longer blob."""
    raw = canary.encode()
    forms = {canary, raw.hex()}
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * offset + raw).decode()
            # Only the 4-character groups made of canary bytes alone are the same wherever it sits.
            forms.add(encoded[(4 if offset else 0) : (offset + len(raw)) // 3 * 4])
    return forms


@dataclass
class Canary:
    """The run's canary and the secrets built around it, one per place a secret can be given."""

    value: str = field(default_factory=lambda: "cnry" + secrets.token_hex(12))  # base64- and URL-safe

    def __post_init__(self) -> None:
        self.forms = canary_forms(self.value)
        # A Standard Webhooks secret: whsec_ and base64 of 24 to 64 bytes. The canary's characters
        # are all base64 ones, so it sits inside the key itself, as a random key's characters would.
        key = self.value + "signing"
        key += "A" * (max(32, -(-len(key) // 4) * 4) - len(key))
        self.signing_secret = "whsec_" + key
        assert 24 <= len(base64.b64decode(key, validate=True)) <= 64
        self.header = f"{self.value}-header"
        self.url_token = f"{self.value}-urltoken"
        self.path_token = f"{self.value}-pathtoken"
        self.smtp_password = f"{self.value}-smtp"
        self.mastodon_token = f"{self.value}-mastodon"
        self.revoked_mastodon_token = f"{self.value}-mastodon-revoked"
        self.x_token = f"{self.value}-x"
        self.bluesky_password = f"{self.value}-bsky"

    def watch(self, *others: str) -> None:
        """Look for ``others`` too: secrets WordClaw holds that the test did not choose (a Bluesky
        session's tokens), or that may be shown once only (a generated or rotated signing secret)."""
        for other in others:
            self.forms |= canary_forms(other)

    def found_in(self, text: str) -> list[str]:
        """The forms of the canary (and of the secrets watched) that ``text`` holds: none, if nothing leaked."""
        return sorted(form for form in self.forms if form in text)


class Transcript:
    """Calls tools through the MCP client and keeps every word that came back."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.texts: list[tuple[str, str]] = []  # (what was called, everything it answered)

    async def _call(self, tool: str, arguments: dict[str, Any]) -> Any:
        result = await self.client.call_tool(tool, arguments)
        said = [getattr(block, "text", "") for block in result.content]
        said.append(json.dumps(result.structured_content))
        said.append(result.model_dump_json())
        self.texts.append((tool, "\n".join(said)))
        return result

    async def ok(self, tool: str, **arguments: Any) -> dict[str, Any]:
        result = await self._call(tool, arguments)
        assert not result.is_error, result.content
        assert result.structured_content is not None
        return result.structured_content

    async def error(self, tool: str, **arguments: Any) -> dict[str, Any]:
        """A call that must fail with a coded error; returns {code, message, remediation, ...}."""
        result = await self._call(tool, arguments)
        assert result.is_error, result.structured_content
        error = json.loads(result.content[0].text)["error"]
        assert set(error) >= {"code", "message", "remediation"}
        return error


# --- the local peers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Mailbox:
    """An SMTP server (aiosmtpd) that accepts ``password`` for SMTP_USER, and answers any other
    login with a 535 that quotes the password it was given."""

    password: str
    received: list[Any] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(envelope)
        return "250 2.0.0 Message accepted"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if isinstance(data, LoginPassword) and (data.login, data.password) == (
            SMTP_USER.encode(),
            self.password.encode(),
        ):
            return AuthResult(success=True)
        given = data.password.decode() if isinstance(data, LoginPassword) else "?"
        return AuthResult(success=False, handled=False, message=f"535 5.7.8 No such user with password {given}")


class EchoingX(FakeX):
    """X's API, but a 401 quotes the Authorization header it was sent."""

    def _post(self, path: str, authorization: str | None, raw: bytes) -> tuple[int, dict[str, Any]]:
        status, body = super()._post(path, authorization, raw)
        if status == 401:
            body["detail"] = f"Unauthorized: {authorization} is not a valid token"
        return status, body


class EchoingMastodon(FakeMastodon):
    """A Mastodon instance whose answers quote the Authorization header they were sent."""

    def _post(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, Any], bool]:
        status, body, drop = super()._post(path, headers, raw)
        bearer = {name.lower(): value for name, value in headers.items()}.get("authorization")
        return status, {**body, "debug": f"authenticated with {bearer}"}, drop


@dataclass
class Peers:
    signed: WebhookReceiver  # answers 200, quoting every secret of the signed webhook target
    refusing: WebhookReceiver  # answers 401, quoting the token in the URL's path
    mailbox: Mailbox
    smtp_port: int
    mastodon: EchoingMastodon
    x: EchoingX
    bluesky: FakeBluesky
    bluesky_refusing: FakeBluesky  # logs in, then refuses the post, quoting the session's access token


@pytest.fixture
def canary() -> Canary:
    return Canary()


@pytest.fixture
def peers(canary: Canary) -> Iterator[Peers]:
    with ExitStack() as stack:
        signed = stack.enter_context(WebhookReceiver())
        signed.behaviour.body = json.dumps(
            {
                "youSent": {
                    "x-api-key": canary.header,
                    "token": canary.url_token,
                    "secret": canary.signing_secret,
                    "key": canary.signing_secret.removeprefix("whsec_"),
                }
            }
        ).encode()
        refusing = stack.enter_context(WebhookReceiver())
        refusing.behaviour.status = 401
        refusing.behaviour.body = json.dumps({"message": f"401: bad webhook token {canary.path_token}"}).encode()

        mailbox = Mailbox(password=canary.smtp_password)
        controller = Controller(
            mailbox,
            hostname="127.0.0.1",
            port=free_port(),
            authenticator=mailbox.authenticate,
            auth_require_tls=False,
        )
        controller.start()
        stack.callback(controller.stop)

        mastodon = stack.enter_context(EchoingMastodon())
        mastodon.instance.token = canary.mastodon_token  # accepted: the post is made
        x = stack.enter_context(EchoingX())
        x.account.token = "the-token-x-expects"  # the canary is refused: a 401
        bluesky = stack.enter_context(FakeBluesky())
        bluesky.account.app_password = canary.bluesky_password  # accepted: a session is made and kept
        bluesky_refusing = stack.enter_context(FakeBluesky())
        bluesky_refusing.account.app_password = canary.bluesky_password
        bluesky_refusing.account.refuse_quoting_authorization = True
        yield Peers(signed, refusing, mailbox, controller.port, mastodon, x, bluesky, bluesky_refusing)


def origin(receiver: WebhookReceiver) -> str:
    parts = urlsplit(receiver.url)
    return f"{parts.scheme}://{parts.netloc}"


async def register_targets(calls: Transcript, canary: Canary, peers: Peers) -> dict[str, dict[str, Any]]:
    """One target per channel, each secret-taking one carrying the canary; two for the webhook and
    the email channels (one to fail). Returns the registered targets by label."""
    suffix = uuid.uuid4().hex[:6]
    smtp = {"host": "127.0.0.1", "port": peers.smtp_port, "security": "none", "from": "news@example.com"}
    feed = {"title": "News", "link": "https://example.com/", "description": "What shipped"}
    specs: dict[str, dict[str, Any]] = {
        "webhook-signed": {
            "channelType": "webhook",
            "config": {
                "url": f"{peers.signed.url}?token={canary.url_token}",
                "headers": {"X-Api-Key": canary.header},
            },
            "secrets": {"signingSecret": canary.signing_secret},
        },
        "webhook-path-token": {
            # No signing secret: one is generated and shown once (generatedSecrets), not the canary.
            "channelType": "webhook",
            "config": {"url": f"{origin(peers.refusing)}/api/webhooks/123456789/{canary.path_token}"},
        },
        "email": {
            "channelType": "email",
            "config": {**smtp, "username": SMTP_USER, "to": ["list@example.com"]},
            "secrets": {"password": canary.smtp_password},
        },
        "email-refused": {
            "channelType": "email",
            "config": {**smtp, "username": "intruder", "to": ["list@example.com"]},
            "secrets": {"password": canary.smtp_password},
        },
        "mastodon": {
            "channelType": "mastodon",
            "config": {"baseUrl": peers.mastodon.base_url},
            "secrets": {"accessToken": canary.mastodon_token},
        },
        "mastodon-refused": {
            "channelType": "mastodon",
            "config": {"baseUrl": peers.mastodon.base_url},
            "secrets": {"accessToken": canary.revoked_mastodon_token},
        },
        "x": {
            "channelType": "x",
            "config": {"baseUrl": peers.x.base_url},
            "secrets": {"accessToken": canary.x_token},
        },
        "bluesky": {
            "channelType": "bluesky",
            "config": {"baseUrl": peers.bluesky.base_url, "identifier": peers.bluesky.account.identifier},
            "secrets": {"appPassword": canary.bluesky_password},
        },
        "bluesky-refused": {
            "channelType": "bluesky",
            "config": {
                "baseUrl": peers.bluesky_refusing.base_url,
                "identifier": peers.bluesky_refusing.account.identifier,
            },
            "secrets": {"appPassword": canary.bluesky_password},
        },
        "rss": {"channelType": "rss", "config": {**feed, "path": f"canary-{suffix}/feed.rss"}},
        "atom": {"channelType": "atom", "config": {**feed, "path": f"canary-{suffix}/feed.atom"}},
    }
    targets = {}
    for label, spec in specs.items():
        targets[label] = await calls.ok("register_target", name=f"{label}-{suffix}", **spec)
    return targets


async def provoke_errors(calls: Transcript, canary: Canary, targets: dict[str, dict[str, Any]]) -> None:
    """Mistakes an agent can make with secret-bearing arguments; none may echo the secret."""
    name = f"bad-{uuid.uuid4().hex[:6]}"
    webhook_url = "https://example.com/hooks/wordclaw"
    refusals = [
        # A signing secret that is not base64: the validator says what is wrong, not what was given.
        (
            "INVALID_TARGET_SECRETS",
            {"channelType": "webhook", "config": {"url": webhook_url}, "secrets": {"signingSecret": canary.value}},
        ),
        (
            "INVALID_TARGET_SECRETS",
            {
                "channelType": "webhook",
                "config": {"url": webhook_url},
                "secrets": {"signingSecret": f"whsec_{canary.value}!!"},
            },
        ),
        # A secret under a name the channel does not know.
        (
            "INVALID_TARGET_SECRETS",
            {
                "channelType": "mastodon",
                "config": {"baseUrl": "https://mastodon.example"},
                "secrets": {"accessToken": canary.mastodon_token, "password": canary.value},
            },
        ),
        # Secrets for a channel that takes none.
        (
            "INVALID_TARGET_SECRETS",
            {
                "channelType": "rss",
                "config": {"path": "never/feed.xml", "title": "T", "link": "https://example.com/"},
                "secrets": {"token": canary.value},
            },
        ),
        # A secret PostgreSQL cannot store (a NUL), refused by the input model.
        (
            "VALIDATION_ERROR",
            {
                "channelType": "email",
                "config": {"host": "127.0.0.1", "from": "a@example.com", "to": ["b@example.com"]},
                "secrets": {"password": f"{canary.smtp_password}\x00"},
            },
        ),
        # Secrets that are not an object of strings, refused by the tool's input schema.
        ("VALIDATION_ERROR", {"channelType": "x", "config": {}, "secrets": [canary.x_token]}),
        ("VALIDATION_ERROR", {"channelType": "x", "config": {}, "secrets": {"accessToken": [canary.x_token]}}),
        # Credentials where they do not belong: user info in a URL, a line break in a header value.
        ("INVALID_TARGET_CONFIG", {"channelType": "webhook", "config": {"url": f"https://u:{canary.value}@e.com/"}}),
        (
            "INVALID_TARGET_CONFIG",
            {"channelType": "webhook", "config": {"url": webhook_url, "headers": {"X-Key": f"{canary.header}\r\n"}}},
        ),
        # An unknown channel, given secrets.
        ("UNSUPPORTED_CHANNEL_TYPE", {"channelType": "nope", "config": {}, "secrets": {"token": canary.value}}),
    ]
    for code, arguments in refusals:
        error = await calls.error("register_target", name=name, **arguments)
        assert error["code"] == code, (arguments, error)

    # A name already taken, with the canary as the new target's secret.
    taken = targets["mastodon"]["name"]
    error = await calls.error(
        "register_target",
        name=taken,
        channelType="mastodon",
        config={"baseUrl": "https://mastodon.example"},
        secrets={"accessToken": canary.mastodon_token},
    )
    assert error["code"] == "TARGET_NAME_TAKEN"
    # Rotation of a channel whose secret WordClaw cannot rotate: its secrets are decrypted first.
    error = await calls.error("rotate_target_secret", targetId=targets["mastodon"]["id"])
    assert error["code"] == "SECRET_ROTATION_UNSUPPORTED"


async def final_plan(calls: Transcript, plan_id: str) -> dict[str, Any]:
    async def settled() -> dict[str, Any] | None:
        plan = await calls.ok("get_plan", planId=plan_id)
        return plan if plan["status"] in FINAL_PLAN_STATUSES else None

    return await eventually(settled, within=30)


# --- what was stored -------------------------------------------------------------------------------


async def table_rows(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """Every row of every table in the public schema, as JSON text (a bytea as \\x and hex)."""
    tables = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
    )
    return {
        row["table_name"]: [
            text for (text,) in await conn.fetch(f'SELECT to_jsonb(t)::text FROM public."{row["table_name"]}" t')
        ]
        for row in tables
    }


async def data_dump(conn: asyncpg.Connection, url: str) -> str:
    """A plain pg_dump of the whole database, data included, by a pg_dump of the server's version."""
    pg_dump = await matching_pg_dump(int(await conn.fetchval("SHOW server_version_num")) // 10000)
    process = await anyio.run_process([str(pg_dump), "--no-password", f"--dbname={url}"], check=False)
    assert process.returncode == 0, process.stderr.decode()
    return process.stdout.decode()


def is_fernet_token(stored: bytes) -> bool:
    """A Fernet token as Fernet writes it: URL-safe base64 (so ``gAAAAA`` first) of a token whose
    first byte is the version, 0x80."""
    try:
        decoded = base64.urlsafe_b64decode(stored)
    except ValueError:
        return False
    return stored.startswith(b"gAAAAA") and decoded[:1] == b"\x80" and len(decoded) >= 1 + 8 + 16 + 16 + 32


def log_texts(records: Iterable[logging.LogRecord]) -> list[tuple[str, str]]:
    formatter = logging.Formatter()
    texts = []
    for record in records:
        if record.name.startswith(PEER_LOGGERS):
            continue
        parts = [record.getMessage()]
        if record.exc_info:
            parts.append(formatter.formatException(record.exc_info))
        if record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(record.stack_info)
        texts.append((f"{record.name}:{record.levelname}", "\n".join(parts)))
    return texts


# --- the test --------------------------------------------------------------------------------------


async def test_a_canary_secret_on_every_channel_shows_up_nowhere_and_is_stored_only_encrypted(
    mcp_client: Client,
    settings: Settings,
    canary: Canary,
    peers: Peers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    taking_secrets = {name for name, cls in adapter_classes().items() if cls.secrets_model is not None}
    assert taking_secrets == SECRET_CHANNELS, "a channel that takes secrets is missing from this test"
    calls = Transcript(mcp_client)

    # Register, list, preview.
    item = await calls.ok(
        "upsert_content_item",
        title="Canary day",
        body="We **shipped** the canary.",
        summary="Shipped.",
        canonicalUrl="https://example.com/canary",
    )
    targets = await register_targets(calls, canary, peers)
    ids = [target["id"] for target in targets.values()]
    assert {target["channelType"] for target in targets.values()} >= SECRET_CHANNELS | {"rss", "atom"}
    signed, path_token = targets["webhook-signed"], targets["webhook-path-token"]
    assert signed["config"]["headers"] == {"X-Api-Key": "[redacted]"}
    assert signed["config"]["url"].endswith("?token=[redacted]")
    assert signed["generatedSecrets"] is None  # the canary was given, so nothing was made
    assert path_token["config"]["url"].endswith("/api/webhooks/123456789/[redacted]")
    assert path_token["generatedSecrets"]["signingSecret"].startswith("whsec_")  # made here, shown once
    listed = await calls.ok("list_targets")
    assert {target["id"] for target in listed["targets"]} == set(ids)
    assert all(target["hasSecrets"] for target in listed["targets"] if target["channelType"] in SECRET_CHANNELS)
    await calls.ok("get_my_entitlements")
    preview = await calls.ok("create_distribution_plan", contentItemId=item["id"], targetIds=ids, dryRun=True)
    assert preview["status"] == "dry_run" and len(preview["previews"]) == len(ids)

    # Deliver to every target: some peers accept, some refuse; several quote the secret they got.
    plan = await calls.ok("create_distribution_plan", contentItemId=item["id"], targetIds=ids, awaitDelivery=True)
    plan = await final_plan(calls, plan["id"])
    by_target = {job["targetId"]: job for job in plan["jobs"]}
    for label, target in targets.items():
        status = "failed" if label in REFUSED else "succeeded"
        assert by_target[target["id"]]["status"] == status, (label, by_target[target["id"]])
    # Drive the failures again: more receipts, more errors, through the same paths.
    await calls.ok("retry_plan", planId=plan["id"])
    plan = await final_plan(calls, plan["id"])
    receipts = (await calls.ok("get_receipts", planId=plan["id"]))["receipts"]
    assert len(receipts) == len(ids) + len(REFUSED)
    errors = [receipt["errorMessage"] for receipt in receipts if not receipt["succeeded"]]
    assert all(errors) and any("[redacted]" in error for error in errors), errors

    # Rotate the signed webhook's secret, keeping the canary as the previous one, and deliver again.
    rotation = await calls.ok("rotate_target_secret", targetId=signed["id"], graceHours=24)
    assert rotation["secrets"]["signingSecret"].startswith("whsec_")
    again = await calls.ok(
        "create_distribution_plan",
        contentItemId=item["id"],
        targetIds=[signed["id"]],
        awaitDelivery=True,
        allowDuplicate=True,
    )
    again = await final_plan(calls, again["id"])
    assert again["status"] == "succeeded"
    await calls.ok("get_receipts", planId=again["id"])

    await provoke_errors(calls, canary, targets)

    # The canaries were really used: the peers got them, so their absence elsewhere means something.
    first, second = peers.signed.requests[0], peers.signed.requests[-1]
    assert first.headers["x-api-key"] == canary.header and first.path.endswith(f"?token={canary.url_token}")
    Webhook(canary.signing_secret).verify(first.body, first.headers)
    Webhook(canary.signing_secret).verify(second.body, second.headers)  # the previous secret, in its grace
    assert peers.refusing.requests[0].path.endswith(canary.path_token)
    assert len(peers.mailbox.received) == 1
    assert peers.mastodon.instance.requests[0]["headers"]["authorization"] == f"Bearer {canary.mastodon_token}"
    assert peers.bluesky.account.sessions == 1 and len(peers.bluesky.account.records) == 1
    # This PDS quoted the session's access token back in each refusal (one per attempt).
    refusing = peers.bluesky_refusing.account
    assert refusing.sessions == 1 and refusing.creates == 2 and not refusing.records

    # 1. No tool result or error, dry run included.
    leaks = [(tool, canary.found_in(text)) for tool, text in calls.texts if canary.found_in(text)]
    assert not leaks, f"the canary came back from tools: {leaks}"
    # The signing secrets WordClaw made are shown in their one answer and nowhere else, and the
    # Bluesky session, a credential too, is kept like the app password: all watched from here on.
    generated = path_token["generatedSecrets"]["signingSecret"]
    rotated = rotation["secrets"]["signingSecret"]
    assert [tool for tool, text in calls.texts if generated in text] == ["register_target"]
    assert [tool for tool, text in calls.texts if rotated in text] == ["rotate_target_secret"]
    canary.watch(generated, rotated, *peers.bluesky.account.issued, *refusing.issued)
    leaks = [
        (tool, canary.found_in(text))
        for tool, text in calls.texts
        if canary.found_in(text) and generated not in text and rotated not in text
    ]
    assert not leaks, f"a secret WordClaw holds came back from tools: {leaks}"

    # 2. No stored row: receipts, events, jobs, entitlement decisions, and every other table.
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await table_rows(conn)
        for table in ("distribution_receipts", "distribution_events", "distribution_jobs"):
            assert rows[table], f"{table} is empty: the test checked nothing there"
        leaks = [
            (table, canary.found_in(text), text[:300])
            for table, texts in rows.items()
            for text in texts
            if canary.found_in(text)
        ]
        assert not leaks, f"a secret is stored in clear: {leaks}"

        # 3. Stored secrets are ciphertext only: Fernet tokens, which decrypt to the canary.
        stored = await conn.fetch("SELECT name, secret_ciphertext FROM distribution_targets")
        sessions = await conn.fetch("SELECT target_id, ciphertext FROM channel_sessions")
    finally:
        await conn.close()
    box = Fernet(settings.secret_keys[0].encode())
    sealed = {row["name"]: bytes(row["secret_ciphertext"]) for row in stored if row["secret_ciphertext"] is not None}
    assert {name.rsplit("-", 1)[0] for name in sealed} == {
        label for label, target in targets.items() if target["channelType"] in SECRET_CHANNELS
    }
    for name, ciphertext in sealed.items():
        assert is_fernet_token(ciphertext), f"{name}'s secret_ciphertext is not a Fernet token: {ciphertext[:16]!r}"
    opened = b"".join(box.decrypt(ciphertext) for ciphertext in sealed.values()).decode()
    for secret in (
        canary.signing_secret,  # kept as previousSigningSecret through the rotation's grace
        canary.header,
        canary.url_token,
        canary.path_token,
        canary.smtp_password,
        canary.mastodon_token,
        canary.revoked_mastodon_token,
        canary.x_token,
        canary.bluesky_password,
    ):
        assert secret in opened, f"{secret} is not among the stored secrets"
    assert {row["target_id"] for row in sessions} == {
        uuid.UUID(targets[label]["id"]) for label in ("bluesky", "bluesky-refused")
    }
    assert all(is_fernet_token(bytes(row["ciphertext"])) for row in sessions)

    # 4. No log record, at DEBUG, from setup on (the local peers' own loggers aside).
    records = [*caplog.get_records("setup"), *caplog.records]
    assert any(record.name.startswith("queue_worker") for record in records), "no worker log was captured"
    leaks = [(name, text[:300]) for name, text in log_texts(records) if canary.found_in(text)]
    assert not leaks, f"a secret was logged: {leaks}"

    # 5. pg_dump, data included, holds the ciphertext and not the canary. Last, as it skips when no
    #    pg_dump of the server's version is installed.
    conn = await asyncpg.connect(settings.database_url)
    try:
        dump = await data_dump(conn, settings.database_url)
    finally:
        await conn.close()
    assert "COPY public.distribution_receipts" in dump and signed["name"] in dump, "the dump holds no data"
    for name, ciphertext in sealed.items():
        assert ciphertext.hex() in dump, f"{name}'s ciphertext is not in the dump"
    leaks = [line[:300] for line in dump.splitlines() if canary.found_in(line)]
    assert not leaks, f"a secret is in the pg_dump: {leaks}"


# --- secrets a peer echoes in a form the scrubbing must still recognise ----------------------------


def echo_json_escaped(canary: Canary) -> tuple[dict[str, Any], bytes]:
    """A signing secret whose key holds a '/', echoed as PHP's json_encode writes JSON: '/' as '\\/'."""
    key = canary.value + "/signing"
    key += "A" * (max(32, -(-len(key) // 4) * 4) - len(key))
    secret = "whsec_" + key
    return {"secrets": {"signingSecret": secret}}, json.dumps({"youSignedWith": secret}).replace("/", "\\/").encode()


def echo_cut_at_the_body_limit(canary: Canary) -> tuple[dict[str, Any], bytes]:
    """A header value echoed where the stored answer is cut (RESPONSE_BODY_LIMIT bytes): the canary is
    kept whole, and only the last characters of the secret are cut off."""
    head, tail = b'{"padding": "', b'", "key": "'
    before = head + b"x" * (RESPONSE_BODY_LIMIT - len(canary.value) - 2 - len(head) - len(tail)) + tail
    assert len(before) + len(canary.value) + 2 == RESPONSE_BODY_LIMIT
    return {"config": {"headers": {"X-Api-Key": canary.header}}}, before + canary.header.encode() + b'"}'


@pytest.mark.parametrize("echo", [echo_json_escaped, echo_cut_at_the_body_limit], ids=lambda echo: echo.__name__)
async def test_a_secret_a_webhook_endpoint_echoes_is_not_stored_or_shown_in_another_form(
    mcp_client: Client, settings: Settings, canary: Canary, receiver: WebhookReceiver, echo: Any
) -> None:
    target_arguments, answer = echo(canary)
    receiver.behaviour.body = answer
    calls = Transcript(mcp_client)
    item = await calls.ok("upsert_content_item", title="Echo", body="An endpoint that says what it got.")
    target = await calls.ok(
        "register_target",
        name=f"echo-{uuid.uuid4().hex[:6]}",
        channelType="webhook",
        config={"url": receiver.url, **target_arguments.get("config", {})},
        secrets=target_arguments.get("secrets"),
    )
    plan = await calls.ok(
        "create_distribution_plan", contentItemId=item["id"], targetIds=[target["id"]], awaitDelivery=True
    )
    plan = await final_plan(calls, plan["id"])
    assert plan["status"] == "succeeded" and len(receiver.requests) == 1
    [receipt] = (await calls.ok("get_receipts", planId=plan["id"]))["receipts"]
    assert receipt["rawMeta"]["responseBody"], "the answer was not stored: the test checked nothing"

    leaks = [(tool, canary.found_in(text)) for tool, text in calls.texts if canary.found_in(text)]
    assert not leaks, f"the echoed secret came back from get_receipts: {receipt['rawMeta']['responseBody'][-120:]}"
    conn = await asyncpg.connect(settings.database_url)
    try:
        stored = [text for texts in (await table_rows(conn)).values() for text in texts if canary.found_in(text)]
    finally:
        await conn.close()
    assert not stored, f"the echoed secret is stored in clear: {[text[-200:] for text in stored]}"
