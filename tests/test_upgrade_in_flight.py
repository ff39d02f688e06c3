"""Migrations 0013-0015 on a database with posts in flight or queued for a retry.

A worker of the earlier release (no MARK_SENDING) is posting to X when the schema is upgraded
(a rolling deploy: `wordclaw db upgrade`, or the first new process to start, applies it while the
old workers run), and is then killed. Nothing the new release knows says the old worker had not
sent it, so 0013 marks such attempts as sending, and the rescue fails them rather than posting
again. A retry the earlier release queued after an attempt that may have reached the channel
keeps that date (Mastodon's key lasts an hour from it). Both were found by a review of issue 15.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import anyio
import pytest
from cryptography.fernet import Fernet

from queue_worker.worker import Worker
from tests.fake_mastodon import FakeMastodon
from tests.fake_x import FakeX
from tests.test_schema import build_at
from wordclaw_mcp.config import Settings
from wordclaw_mcp.database import apply_schema, connect, load_migrations
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.secrets import SecretBox, target_binding

pytestmark = pytest.mark.anyio

LOCAL_AGENT = uuid.UUID("00000000-0000-0000-0000-000000000001")


@pytest.fixture
def x() -> Iterator[FakeX]:
    with FakeX() as fake:
        yield fake


async def test_an_x_post_in_flight_at_the_upgrade_is_not_sent_again_after_its_old_worker_dies(
    empty_database_url: str, settings: Settings, x: FakeX
) -> None:
    url = empty_database_url
    key = Fernet.generate_key().decode()
    conn = await connect(url)
    try:
        await build_at(conn, load_migrations()[:12])  # the earlier release's database
        await conn.execute("INSERT INTO tenants (id) VALUES ('default') ON CONFLICT DO NOTHING")
        await conn.execute(
            "INSERT INTO agents (id, tenant_id, name, scopes) VALUES ($1, 'default', 'local-agent', '{admin}') "
            "ON CONFLICT DO NOTHING",
            LOCAL_AGENT,
        )
        item = await conn.fetchval(
            "INSERT INTO content_items (title, body_markdown, tenant_id, created_by_agent_id) "
            "VALUES ('Launch', 'We shipped it.', 'default', $1) RETURNING id",
            LOCAL_AGENT,
        )
        target = uuid.uuid4()
        sealed = SecretBox([key]).encrypt({"accessToken": x.account.token}, bound_to=target_binding(target))
        await conn.execute(
            "INSERT INTO distribution_targets (id, name, channel_type, config_json, secret_ciphertext, tenant_id) "
            "VALUES ($1, 'x', 'x', $2, $3, 'default')",
            target,
            {"baseUrl": x.base_url},
            sealed,
        )
        plan = await conn.fetchval(
            "INSERT INTO distribution_plans (content_item_id, content_version, created_by_agent_id, tenant_id) "
            "VALUES ($1, 1, $2, 'default') RETURNING id",
            item,
            LOCAL_AGENT,
        )
        text = "Launch\n\nWe shipped it."
        # The old worker claimed the job and sent the post; X made it (it answered slowly).
        await conn.execute(
            "INSERT INTO distribution_jobs (plan_id, target_id, max_attempts, payload_snapshot, status, attempt, "
            "lease_expires_at, locked_by) VALUES ($1, $2, 8, $3, 'running', 1, now() + interval '30 s', 'old')",
            plan,
            target,
            {"text": text},
        )
        x.account.posts.append({"id": "1", "text": text})
        x.account.asked.append(text)

        await apply_schema(conn)  # 0013, 0014, 0015, with the old worker mid-post
        # The old worker is killed; its lease runs out.
        await conn.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 s'")
    finally:
        await conn.close()

    async with Runtime.open(replace(settings, database_url=url, secret_keys=(key,))) as runtime:
        worker = Worker(runtime, name="new")
        assert await worker.rescue() == 1
        await worker.run_once()
        async with runtime.pool.acquire() as db:
            status, error = await db.fetchrow("SELECT status, last_error FROM distribution_jobs")
    assert x.account.asked == [text], f"X was sent the post again after the upgrade (job {status}: {error})"


@pytest.fixture
def mastodon() -> Iterator[FakeMastodon]:
    with FakeMastodon() as fake:
        yield fake


async def test_a_mastodon_retry_queued_by_the_earlier_release_is_not_posted_after_the_keys_hour(
    empty_database_url: str, settings: Settings, mastodon: FakeMastodon
) -> None:
    """The earlier release retried a Mastodon 5xx after posting; its retry is still queued at the
    upgrade, two hours after that attempt (the schedule's delays grow to hours). Migration 0013 leaves
    maybe_sent_at empty, so the new release sees a job that never reached Mastodon and sends it with
    a key Mastodon has forgotten: a second status."""
    url = empty_database_url
    key = Fernet.generate_key().decode()
    job = uuid.uuid4()
    text = "Launch\n\nWe shipped it."
    # The earlier release's attempt two hours ago: Mastodon made the status, then answered 503.
    request = urllib.request.Request(
        mastodon.base_url + "/api/v1/statuses",
        data=json.dumps({"status": text}).encode(),
        headers={
            "authorization": f"Bearer {mastodon.instance.token}",
            "idempotency-key": str(job),
            "content-type": "application/json",
        },
    )
    await anyio.to_thread.run_sync(urllib.request.urlopen, request)
    mastodon.instance.clock += timedelta(hours=2)
    conn = await connect(url)
    try:
        await build_at(conn, load_migrations()[:12])
        await conn.execute("INSERT INTO tenants (id) VALUES ('default') ON CONFLICT DO NOTHING")
        await conn.execute(
            "INSERT INTO agents (id, tenant_id, name, scopes) VALUES ($1, 'default', 'local-agent', '{admin}') "
            "ON CONFLICT DO NOTHING",
            LOCAL_AGENT,
        )
        item = await conn.fetchval(
            "INSERT INTO content_items (title, body_markdown, tenant_id, created_by_agent_id) "
            "VALUES ('Launch', 'We shipped it.', 'default', $1) RETURNING id",
            LOCAL_AGENT,
        )
        target = uuid.uuid4()
        sealed = SecretBox([key]).encrypt({"accessToken": mastodon.instance.token}, bound_to=target_binding(target))
        await conn.execute(
            "INSERT INTO distribution_targets (id, name, channel_type, config_json, secret_ciphertext, tenant_id) "
            "VALUES ($1, 'toots', 'mastodon', $2, $3, 'default')",
            target,
            {"baseUrl": mastodon.base_url},
            sealed,
        )
        plan = await conn.fetchval(
            "INSERT INTO distribution_plans (content_item_id, content_version, created_by_agent_id, tenant_id) "
            "VALUES ($1, 1, $2, 'default') RETURNING id",
            item,
            LOCAL_AGENT,
        )
        await conn.execute(
            "INSERT INTO distribution_jobs (id, plan_id, target_id, max_attempts, payload_snapshot, status, attempt, "
            "last_error, next_attempt_at, updated_at) VALUES ($1, $2, $3, 8, $4, 'queued', 1, "
            "'Mastodon answered HTTP 503: Service Unavailable', now(), now() - interval '2 hours')",
            job,
            plan,
            target,
            {"status": text},
        )
        await conn.execute(
            "INSERT INTO distribution_receipts (job_id, attempt, succeeded, status_code, error_message, created_at) "
            "VALUES ($1, 1, false, 503, 'Mastodon answered HTTP 503: Service Unavailable', "
            "now() - interval '2 hours')",
            job,
        )
        await apply_schema(conn)
    finally:
        await conn.close()

    async with Runtime.open(replace(settings, database_url=url, secret_keys=(key,))) as runtime:
        await Worker(runtime, name="new").run_once()
    assert len(mastodon.instance.statuses) == 1, "Mastodon made a second status after the upgrade"
