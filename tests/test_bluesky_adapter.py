"""The Bluesky channel against a faithful local PDS (tests/fake_bluesky.py): one login reused and
refreshed, kept encrypted; link facets at UTF-8 byte offsets; and a record key per job, read
back before a job that may have posted is posted again (the PDS answers a key used twice with a
bare 500), so a retry finds its post instead of posting twice or failing for ever."""

from __future__ import annotations

import json
from dataclasses import replace

import asyncpg
import pytest

from queue_worker.adapters.bluesky import record_key
from queue_worker.worker import Worker
from tests.fake_bluesky import DID, FakeBluesky
from wordclaw_mcp.config import Settings
from wordclaw_mcp.models import CreateDistributionPlanInput, PlanRef, RegisterTargetInput, UpsertContentItemInput
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService
from wordclaw_mcp.text import link_facets

pytestmark = pytest.mark.anyio

LINK = "https://example.com/posts/fan-out"


async def target(service: DistributionService, pds: FakeBluesky, password: str | None = None):
    return await service.register_target(
        RegisterTargetInput(
            name="skeets",
            channel_type="bluesky",
            config={"baseUrl": pds.base_url, "identifier": pds.account.identifier},
            secrets={"appPassword": password or pds.account.app_password},
        )
    )


async def publish(service: DistributionService, target_id, title: str = "Ünïcödé 日本 👍🏽 launch"):
    item = await service.upsert_content_item(
        UpsertContentItemInput(title=title, body="We shipped.", canonical_url=LINK)
    )
    return await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target_id])
    )


async def test_a_post_carries_link_facets_at_byte_offsets_and_the_session_is_kept_encrypted(
    service: DistributionService, worker: Worker, pds: FakeBluesky, db: asyncpg.Connection
) -> None:
    registered = await target(service, pds)
    plan = await publish(service, registered.id)
    await worker.run_once()

    [(rkey, record)] = pds.account.records.items()
    assert record["text"] == f"Ünïcödé 日本 👍🏽 launch\n\nWe shipped.\n\n{LINK}"
    [facet] = record["facets"]
    assert record["text"].encode()[facet["index"]["byteStart"] : facet["index"]["byteEnd"]] == LINK.encode()
    assert facet["index"]["byteStart"] > record["text"].index(LINK), "offsets are bytes, not characters"
    job_id = plan.jobs[0].id
    assert rkey == record_key(str(job_id))
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.succeeded and receipt.external_url == f"https://bsky.app/profile/{DID}/post/{rkey}"

    ciphertext = await db.fetchval("SELECT ciphertext FROM channel_sessions WHERE target_id = $1", registered.id)
    assert ciphertext and b"access-" not in ciphertext and b"refresh-" not in ciphertext

    await publish(service, registered.id, title="Second")
    await worker.run_once()
    assert pds.account.sessions == 1, "the session was not reused"


async def test_an_expired_session_is_refreshed(service: DistributionService, worker: Worker, pds: FakeBluesky) -> None:
    registered = await target(service, pds)
    await publish(service, registered.id)
    await worker.run_once()
    pds.account.expire_sessions()
    plan = await publish(service, registered.id, title="After expiry")
    await worker.run_once()
    assert (await service.get_plan(PlanRef(plan_id=plan.id))).status == "succeeded"
    assert (pds.account.sessions, pds.account.refreshes) == (2, 1)


async def test_a_worker_without_the_setting_logs_in_refreshes_and_posts_to_a_pds_on_loopback(
    service: DistributionService, settings: Settings, pds: FakeBluesky
) -> None:
    # The PDS listens on 127.0.0.1, which the target was registered as allowed to reach (the
    # settings fixture's server): login, refresh and post all go by the target's policy.
    registered = await target(service, pds)
    async with Runtime.open(replace(settings, allow_private_targets=False)) as strict:
        first = await publish(service, registered.id)
        await Worker(strict).run_once()
        pds.account.expire_sessions()
        second = await publish(service, registered.id, title="After expiry")
        await Worker(strict).run_once()
    for plan in (first, second):
        done = await service.get_plan(PlanRef(plan_id=plan.id))
        assert done.status == "succeeded", done.jobs[0].last_error
    assert (pds.account.sessions, pds.account.refreshes, len(pds.account.records)) == (2, 1, 2)


async def test_a_retry_after_a_lost_answer_reads_its_post_back_instead_of_posting_again(
    service: DistributionService, worker: Worker, pds: FakeBluesky, db: asyncpg.Connection
) -> None:
    registered = await target(service, pds)
    plan = await publish(service, registered.id)
    pds.account.drop_answers = 1
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == "queued"
    await db.execute("UPDATE distribution_jobs SET next_attempt_at = now() WHERE id = $1", job.id)
    await worker.run_once()
    done = await service.get_plan(PlanRef(plan_id=plan.id))
    assert done.status == "succeeded"
    # Looked before posting: one record, one create, and the URL of the post the first attempt made.
    assert (pds.account.creates, pds.account.reads, len(pds.account.records)) == (1, 1, 1)
    last = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts[-1]
    assert last.succeeded and last.external_url.endswith("/post/" + record_key(str(job.id)))
    assert last.raw_meta["foundExisting"] is True


async def test_a_job_whose_post_exists_unbeknown_meets_the_pds_500_and_succeeds_with_the_post(
    service: DistributionService, worker: Worker, pds: FakeBluesky, db: asyncpg.Connection
) -> None:
    """A redrive forgets what earlier attempts may have sent (someone checked); if the post is there
    after all, the PDS answers the repeated key with a bare 500, and the record says the rest."""
    registered = await target(service, pds)
    plan = await publish(service, registered.id)
    pds.account.drop_answers = 1
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    await db.execute("UPDATE distribution_jobs SET status = 'failed', finished_at = now() WHERE id = $1", job.id)
    assert await service.redrive(job_ids=[job.id]) == [job.id]
    await worker.run_once()
    assert (await service.get_plan(PlanRef(plan_id=plan.id))).status == "succeeded"
    assert (pds.account.creates, pds.account.reads, len(pds.account.records)) == (2, 1, 1)
    last = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts[-1]
    assert last.succeeded and last.raw_meta["foundExisting"] is True


async def test_a_rescued_attempt_is_read_back_before_it_is_posted_again(
    service: DistributionService, worker: Worker, pds: FakeBluesky, db: asyncpg.Connection
) -> None:
    """A worker killed after the PDS made the post: its lease runs out, the job is rescued, and the
    next attempt finds the post rather than meeting the 500 for ever."""
    registered = await target(service, pds)
    plan = await publish(service, registered.id)
    [claimed] = await worker.claim(1)
    pds.account.drop_answers = 1
    await worker.attempt(claimed)  # the post is made; its answer lost; the worker "dies" before writing
    await db.execute("UPDATE distribution_jobs SET lease_expires_at = now() - interval '1 second'")
    assert await Worker(service.runtime, name="rescuer").rescue() == 1
    await worker.run_once()
    assert (await service.get_plan(PlanRef(plan_id=plan.id))).status == "succeeded"
    assert (pds.account.creates, len(pds.account.records)) == (1, 1)


async def test_a_wrong_app_password_fails_the_job_without_showing_it(
    service: DistributionService, worker: Worker, pds: FakeBluesky
) -> None:
    registered = await target(service, pds, password="wrong-pass-word-here")
    plan = await publish(service, registered.id)
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == "failed" and "appPassword" in job.last_error
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert receipt.status_code == 401 and "wrong-pass-word-here" not in json.dumps(receipt.model_dump(mode="json"))


async def test_a_spent_rate_limit_suspends_the_target(
    service: DistributionService, worker: Worker, pds: FakeBluesky
) -> None:
    registered = await target(service, pds)
    pds.account.remaining = 0
    plan = await publish(service, registered.id)
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == "queued"
    [listed] = (await service.list_targets()).targets
    assert listed.suspended_until is not None


@pytest.mark.parametrize(
    ("text", "spans"),
    [
        (f"see {LINK}", [(4, 4 + len(LINK))]),
        (f"日本 {LINK} and https://a.example.com/b", [(7, 7 + len(LINK)), (7 + len(LINK) + 5, 7 + len(LINK) + 28)]),
        (f"👍🏽 {LINK}", [(9, 9 + len(LINK))]),
        ("no links, example.com is not one", []),
    ],
)
def test_link_facets_count_utf8_bytes(text: str, spans: list[tuple[int, int]]) -> None:
    facets = link_facets(text)
    assert [(f["index"]["byteStart"], f["index"]["byteEnd"]) for f in facets] == spans
    assert all(f["features"][0]["$type"] == "app.bsky.richtext.facet#link" for f in facets)


def test_a_record_key_is_a_tid_shaped_key_stable_per_job() -> None:
    key = record_key("3b6f0a0e-6a1b-4b8e-9a57-6d7f2c1e9f10")
    assert key == record_key("3b6f0a0e-6a1b-4b8e-9a57-6d7f2c1e9f10") != record_key("another job")
    assert len(key) == 13 and set(key) <= set("234567abcdefghijklmnopqrstuvwxyz") and key[0] in "234567abcdefghij"


async def test_session_tokens_a_pds_echoes_are_stored_and_shown_nowhere(
    service: DistributionService, worker: Worker, pds: FakeBluesky, db: asyncpg.Connection
) -> None:
    registered = await target(service, pds)
    await publish(service, registered.id)
    await worker.run_once()  # a session made and kept
    pds.account.expire_sessions()
    pds.account.refuse_quoting_authorization = True
    plan = await publish(service, registered.id, title="Refused")
    await worker.run_once()  # the kept session has expired: refreshed, then the post is refused

    [job] = (await service.get_plan(PlanRef(plan_id=plan.id))).jobs
    assert job.status == "failed" and "InvalidRequest" in job.last_error and "[redacted]" in job.last_error
    [receipt] = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert "authorization: Bearer [redacted]" in receipt.raw_meta["responseBody"], "the PDS echoed nothing"
    tokens = pds.account.issued
    assert (pds.account.sessions, pds.account.refreshes, len(tokens)) == (2, 1, 4)
    stored = [
        text
        for table in ("distribution_receipts", "distribution_jobs", "distribution_events")
        for (text,) in await db.fetch(f"SELECT to_jsonb(t)::text FROM {table} t")
    ]
    shown = [receipt.model_dump_json(), job.model_dump_json()]
    leaks = [(token, text[:200]) for token in tokens for text in stored + shown if token in text]
    assert not leaks, leaks
