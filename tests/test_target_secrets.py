"""What the service keeps to itself: credentials in target URLs, fragments of secrets, and what
its tools show of a target."""

from __future__ import annotations

import json
import secrets as random
import uuid
from urllib.parse import quote, urlsplit

import asyncpg
import pytest
from cryptography.fernet import Fernet
from mcp import Client
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from queue_worker.adapters import DeliveryResult, DeliveryTarget, WebhookAdapter
from queue_worker.worker import Worker, redact
from tests.helpers import call, new_signing_secret, publish
from wordclaw_mcp import queries
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import (
    CreateDistributionPlanInput,
    PlanRef,
    RegisterTargetInput,
    RotateTargetSecretInput,
    UpsertContentItemInput,
)
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.redaction import scrub
from wordclaw_mcp.secrets import SecretBox
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio


def endpoint(receiver: WebhookReceiver) -> str:
    """The receiver's scheme, host and port, for URLs with a path of the test's choosing."""
    parts = urlsplit(receiver.url)
    return f"{parts.scheme}://{parts.netloc}"


async def register(service: DistributionService, url: str, **secrets: str) -> dict:
    target = await service.register_target(
        RegisterTargetInput(
            name=f"hook-{uuid.uuid4().hex[:8]}", channel_type="webhook", config={"url": url}, secrets=secrets or None
        )
    )
    return target.model_dump(mode="json", by_alias=True)


async def deliver_once(service: DistributionService, worker: Worker, target_id: str) -> str:
    """Queue one plan to the target, run one worker pass over it; the receipts as JSON."""
    item = await service.upsert_content_item(UpsertContentItemInput(title="T", body="b"))
    plan = await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[uuid.UUID(target_id)])
    )
    assert await worker.run_once() == 1
    return (await service.get_receipts(PlanRef(plan_id=plan.id))).model_dump_json(by_alias=True)


# --- credentials in target URLs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["https://alice:s3cr3t-Passw0rd@example.com/hook", "https://alice-the-user@example.com/hook"],
)
async def test_user_info_in_a_target_url_is_refused_without_echoing_it(service: DistributionService, url: str) -> None:
    with pytest.raises(DistributionError) as refused:
        await register(service, url)
    error = refused.value
    assert error.code == "INVALID_TARGET_CONFIG"
    assert "config.url" in error.message and "user name or password" in error.message
    assert error.remediation
    said = json.dumps(error.to_dict())
    assert "s3cr3t-Passw0rd" not in said and "alice" not in said
    assert (await service.list_targets()).targets == []


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("/hooks/wordclaw?token={token}&format=json", "/hooks/wordclaw?token=[redacted]&format=[redacted]"),
        ("/services/T0001/B0002/{token}", "/services/T0001/B0002/[redacted]"),  # Slack's layout
        ("/api/webhooks/123456789/{token}", "/api/webhooks/123456789/[redacted]"),  # Discord's layout
    ],
)
async def test_tokens_in_a_target_url_are_stored_encrypted_and_shown_redacted(
    service: DistributionService,
    worker: Worker,
    receiver: WebhookReceiver,
    db: asyncpg.Connection,
    path: str,
    shown: str,
) -> None:
    token = random.token_urlsafe(24)
    full_path = path.format(token=token)
    receiver.behaviour.body = json.dumps({"youSent": full_path, "token": token}).encode()

    target = await register(service, endpoint(receiver) + full_path)
    assert target["config"] == {"url": endpoint(receiver) + shown}
    assert target["hasSecrets"] is True
    listed = (await service.list_targets()).model_dump_json(by_alias=True)
    assert endpoint(receiver) + shown in listed and token not in listed
    stored = await db.fetch(queries.LIST_TARGETS, "default")  # config_json as stored
    assert token not in json.dumps([row["config"] for row in stored])

    receipts = await deliver_once(service, worker, target["id"])
    # Delivery still goes to the whole URL, query included.
    assert [request.path for request in receiver.requests] == [full_path]
    assert token not in receipts
    receipt = json.loads(receipts)["receipts"][0]
    assert receipt["succeeded"] is True
    assert receipt["externalUrl"] == endpoint(receiver) + shown.partition("?")[0]
    assert json.loads(receipt["rawMeta"]["responseBody"])["token"] == "[redacted]"


async def test_a_url_without_credentials_is_stored_as_it_is(service: DistributionService) -> None:
    target = await register(service, "https://example.com/hooks/wordclaw")
    assert target["config"] == {"url": "https://example.com/hooks/wordclaw"}
    assert target["hasSecrets"] is True  # its generated signing secret


async def test_targets_stored_before_urls_were_sealed_are_listed_redacted_and_still_delivered(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver, db: asyncpg.Connection
) -> None:
    token = random.token_urlsafe(24)
    full_path = f"/hooks/wordclaw?token={token}"
    # A row as register_target wrote it before: the whole URL in config_json, no secrets.
    row = await db.fetchrow(
        queries.INSERT_TARGET,
        uuid.uuid4(),
        "legacy",
        "webhook",
        {"url": endpoint(receiver) + full_path},
        None,
        None,
        None,
        None,
        "default",
        None,
        True,  # registered where loopback targets are allowed, as the receiver needs
    )

    listed = (await service.list_targets()).targets
    assert [target.config for target in listed] == [{"url": endpoint(receiver) + "/hooks/wordclaw?token=[redacted]"}]
    await deliver_once(service, worker, str(row["id"]))
    assert [request.path for request in receiver.requests] == [full_path]


# --- fragments of secrets ----------------------------------------------------------------------


def test_scrubbing_covers_the_meaningful_fragments_of_each_secret() -> None:
    signing_secret = new_signing_secret()
    key = signing_secret.removeprefix("whsec_")
    path_token = random.token_urlsafe(18)
    query_value = f"a/b+c={random.token_hex(8)}"
    url = f"https://hooks.slack.com/services/T0001/B0002/{path_token}?sig={quote(query_value, safe='')}"
    echoed = (
        f"bad key {key}; path {path_token}; query {query_value}; encoded {quote(query_value, safe='')} "
        f"or {quote(query_value)}; "
        f"url {url}; encoded url {quote(url, safe='')}; page 1 of json"
    )
    result = redact(
        DeliveryResult(succeeded=False, error=echoed, external_url=url, raw_meta={"body": [echoed], "n": 3}),
        [signing_secret, url],
    )
    stored = json.dumps([result.error, result.external_url, result.raw_meta])
    for fragment in (key, path_token, query_value, quote(query_value, safe=""), quote(query_value)):
        assert fragment not in stored
    assert "bad key [redacted]; path [redacted]" in result.error
    assert result.error.endswith("page 1 of json")  # short, ordinary text is left alone
    assert result.raw_meta["n"] == 3
    assert scrub("nothing secret here", [signing_secret, url]) == "nothing secret here"


def test_scrubbing_looks_for_exactly_the_secrets_it_is_given_each_time() -> None:
    # The fragments are worked out once per set of secrets and kept: a kept set must never
    # stand in for another.
    first, second = new_signing_secret(), new_signing_secret()
    both = f"{first} and {second}"
    assert scrub(both, [first]) == f"[redacted] and {second}"
    assert scrub(both, [second]) == f"{first} and [redacted]"
    assert scrub(both, [first, second]) == "[redacted] and [redacted]"
    assert scrub(both, [first]) == f"[redacted] and {second}"


def test_decrypted_secrets_are_the_callers_own_and_only_the_right_keys_read_them() -> None:
    box = SecretBox([Fernet.generate_key().decode()])
    sealed = box.encrypt({"token": "t0ken"}, bound_to="target:1")
    mine = box.decrypt(sealed, bound_to="target:1")
    mine["token"] = "changed by the caller"
    assert box.decrypt(sealed, bound_to="target:1") == {"token": "t0ken"}
    with pytest.raises(DistributionError) as refused:
        SecretBox([Fernet.generate_key().decode()]).decrypt(sealed, bound_to="target:1")
    assert refused.value.code == "SECRET_KEY_MISMATCH"


async def test_a_server_echoing_part_of_the_signing_secret_is_redacted_from_the_receipt(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    signing_secret = new_signing_secret()
    key = signing_secret.removeprefix("whsec_")
    receiver.behaviour.status = 401
    receiver.behaviour.body = json.dumps({"error": f"signature does not match key {key}"}).encode()
    target = await register(service, receiver.url, signingSecret=signing_secret)
    receipts = await deliver_once(service, worker, target["id"])
    assert key not in receipts
    assert "signature does not match key [redacted]" in json.loads(receipts)["receipts"][0]["rawMeta"]["responseBody"]


def test_a_delivery_target_never_prints_its_secrets() -> None:
    signing_secret = new_signing_secret()
    url = f"https://example.com/hook?token={random.token_urlsafe(24)}"
    sealed = WebhookAdapter().seal_config({"url": url})
    target = DeliveryTarget(
        id=uuid.uuid4(), name="hook", config=sealed.config, secrets={"signingSecret": signing_secret, **sealed.secrets}
    )
    for printed in (repr(target), str(target), repr(sealed), f"{target}"):
        assert signing_secret not in printed and url not in printed
        assert urlsplit(url).query.partition("=")[2] not in printed
    assert "hook" in repr(target)


# --- signing-secret rotation -------------------------------------------------------------------


async def test_a_rotation_signs_with_both_secrets_during_the_grace_and_with_the_new_one_after(
    service: DistributionService, worker: Worker, receiver: WebhookReceiver
) -> None:
    old = new_signing_secret()
    plan, [target_id] = await publish(service, [receiver.url], secret=old)
    rotation = await service.rotate_target_secret(RotateTargetSecretInput(target_id=target_id, grace_hours=1))
    new = rotation.secrets["signingSecret"]
    assert new.startswith("whsec_") and new != old and rotation.previous_valid_until is not None
    await worker.run_once()

    [request] = receiver.requests
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):  # a receiver holding either secret accepts the delivery
        Webhook(secret).verify(request.body, request.headers)

    # A second rotation with no grace: only the newest secret signs.
    newest = (await service.rotate_target_secret(RotateTargetSecretInput(target_id=target_id, grace_hours=0))).secrets
    await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=plan.content_item_id, target_ids=[target_id], allow_duplicate=True)
    )
    await worker.run_once()
    latest = receiver.requests[-1]
    Webhook(newest["signingSecret"]).verify(latest.body, latest.headers)
    for retired in (old, new):
        with pytest.raises(WebhookVerificationError):
            Webhook(retired).verify(latest.body, latest.headers)
    listed = (await service.list_targets()).model_dump_json()
    assert all(secret not in listed for secret in (old, new, newest["signingSecret"]))


async def test_rotating_an_unknown_target_or_a_channel_without_a_rotatable_secret_is_refused(
    service: DistributionService,
) -> None:
    with pytest.raises(DistributionError) as unknown:
        await service.rotate_target_secret(RotateTargetSecretInput(target_id=uuid.uuid4()))
    assert unknown.value.code == "TARGET_NOT_FOUND"
    mastodon = await service.register_target(
        RegisterTargetInput(
            name="toots",
            channel_type="mastodon",
            config={"baseUrl": "https://mastodon.example"},
            secrets={"accessToken": "t"},
        )
    )
    with pytest.raises(DistributionError) as unsupported:
        await service.rotate_target_secret(RotateTargetSecretInput(target_id=mastodon.id))
    assert unsupported.value.code == "SECRET_ROTATION_UNSUPPORTED"


async def test_a_target_shows_a_fingerprint_of_its_secrets_that_changes_with_them(mcp_client: Client) -> None:
    secret = new_signing_secret()
    first, second = [
        await call(
            mcp_client,
            "register_target",
            name=f"fp-{n}",
            channelType="webhook",
            config={"url": "https://hooks.example.com/in"},
            secrets={"signingSecret": secret},
        )
        for n in range(2)
    ]
    listed = {target["id"]: target for target in (await call(mcp_client, "list_targets"))["targets"]}
    prints = [listed[target["id"]]["secretFingerprint"] for target in (first, second)]
    assert all(fingerprint.startswith("hmac-sha256:") and len(fingerprint) == 24 for fingerprint in prints)
    # The same secret on two targets: two fingerprints, so a tag says nothing across rows.
    assert prints[0] != prints[1] and secret.removeprefix("whsec_")[:8] not in json.dumps(listed)
    await call(mcp_client, "rotate_target_secret", targetId=first["id"], graceHours=0)
    after = {target["id"]: target for target in (await call(mcp_client, "list_targets"))["targets"]}
    assert after[first["id"]]["secretFingerprint"] not in (None, prints[0])
    assert after[second["id"]]["secretFingerprint"] == prints[1]
