"""The Mastodon channel against a faithful local instance (tests/fake_mastodon.py): a status per
item, counted and cut as Mastodon counts, posted once however many times the job is tried."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from queue_worker.adapters.mastodon import MastodonAdapter
from queue_worker.worker import Worker
from tests.fake_mastodon import FakeMastodon
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import (
    ContentItem,
    CreateDistributionPlanInput,
    Plan,
    PlanRef,
    RegisterTargetInput,
    TransformPolicy,
    UpsertContentItemInput,
)
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

LINK = "https://example.com/posts/launch-" + "x" * 60  # long, and still 23 to Mastodon


@pytest.fixture
def mastodon() -> Iterator[FakeMastodon]:
    with FakeMastodon() as fake:
        yield fake


async def item_and_target(
    service: DistributionService, mastodon: FakeMastodon, *, body: str = "We **shipped** it.", **config: object
):
    item = await service.upsert_content_item(
        UpsertContentItemInput(title="Launch day", body=body, summary=None, canonical_url=LINK)
    )
    target = await service.register_target(
        RegisterTargetInput(
            name="toots",
            channel_type="mastodon",
            config={"baseUrl": mastodon.base_url, **config},
            secrets={"accessToken": mastodon.instance.token},
        )
    )
    return item, target


async def plan(service: DistributionService, item_id, target_id, policy: TransformPolicy | None = None) -> Plan:
    return await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item_id, target_ids=[target_id], transform_policy=policy)
    )


async def test_an_item_is_posted_as_a_status_and_the_receipt_links_to_it(
    service: DistributionService, worker: Worker, mastodon: FakeMastodon
) -> None:
    item, target = await item_and_target(service, mastodon, visibility="unlisted")
    created = await plan(service, item.id, target.id, TransformPolicy(hashtags=["launch"]))
    assert await worker.run_once() == 1

    [status] = mastodon.instance.statuses
    assert status["text"] == f"Launch day\n\nWe shipped it.\n\n#launch\n\n{LINK}"
    assert status["visibility"] == "unlisted"
    [receipt] = (await service.get_receipts(PlanRef(plan_id=created.id))).receipts
    assert receipt.succeeded and receipt.external_url == status["url"]
    [request] = mastodon.instance.requests
    assert request["headers"]["idempotency-key"] == str(created.jobs[0].id)


async def test_a_retry_after_a_lost_answer_reuses_its_idempotency_key_and_posts_once(
    service: DistributionService, worker: Worker, mastodon: FakeMastodon, db: asyncpg.Connection
) -> None:
    item, target = await item_and_target(service, mastodon)
    created = await plan(service, item.id, target.id)
    mastodon.instance.drop_answers = 1  # the status is made, the answer never arrives
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=created.id))).jobs
    assert (job.status, job.attempt) == ("queued", 1)

    await db.execute("UPDATE distribution_jobs SET next_attempt_at = now() WHERE id = $1", job.id)
    await worker.run_once()
    done = await service.get_plan(PlanRef(plan_id=created.id))
    assert done.status == "succeeded"
    keys = [r["headers"]["idempotency-key"] for r in mastodon.instance.requests]
    assert keys == [str(job.id), str(job.id)]
    assert len(mastodon.instance.statuses) == 1, "posted twice"


async def test_after_its_key_may_have_expired_a_job_that_may_have_posted_is_not_sent_again(
    service: DistributionService, worker: Worker, mastodon: FakeMastodon, db: asyncpg.Connection
) -> None:
    """Mastodon keeps an Idempotency-Key for an hour. A retry later than that (a long throttle, a
    slow queue) would post again, so it ends DELIVERY_OUTCOME_UNKNOWN instead, unsent."""
    item, target = await item_and_target(service, mastodon)
    created = await plan(service, item.id, target.id)
    mastodon.instance.drop_answers = 1  # the status is made, the answer never arrives
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=created.id))).jobs
    assert job.status == "queued"
    # Two hours pass, for the instance and for the queue.
    mastodon.instance.clock += timedelta(hours=2)
    await db.execute(
        "UPDATE distribution_jobs SET maybe_sent_at = maybe_sent_at - interval '2 hours', next_attempt_at = now() "
        "WHERE id = $1",
        job.id,
    )
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=created.id))).jobs
    assert job.status == "failed" and job.last_error.startswith("DELIVERY_OUTCOME_UNKNOWN"), job
    assert "idempotency key" in job.last_error and "redrive" in job.last_error
    assert len(mastodon.instance.requests) == 1 and len(mastodon.instance.statuses) == 1


async def test_a_retry_that_would_fall_after_the_hour_comes_before_it_or_not_at_all(
    service: DistributionService, worker: Worker, mastodon: FakeMastodon, db: asyncpg.Connection
) -> None:
    """A 5xx may come after the status was made. The schedule's next retry after a fourth attempt
    is two hours away: it is brought inside the key's hour, and once there is no time left in the
    hour the job fails instead."""
    item, target = await item_and_target(service, mastodon)
    created = await plan(service, item.id, target.id)
    [queued] = created.jobs
    mastodon.instance.error_after_posting = 503
    await db.execute("UPDATE distribution_jobs SET attempt = 3 WHERE id = $1", queued.id)
    await worker.run_once()  # attempt 4: the schedule says two hours
    row = await db.fetchrow(
        "SELECT status, next_attempt_at - now() AS wait, next_attempt_at - maybe_sent_at AS after_first "
        "FROM distribution_jobs WHERE id = $1",
        queued.id,
    )
    assert row["status"] == "queued"
    assert timedelta(minutes=50) < row["wait"] and row["after_first"] < timedelta(hours=1), dict(row)
    assert len(mastodon.instance.statuses) == 1

    # Later in the hour, with a minute or less left: no retry can make it in time.
    mastodon.instance.unavailable = 502
    await db.execute(
        "UPDATE distribution_jobs SET maybe_sent_at = now() - interval '3450 seconds', next_attempt_at = now() "
        "WHERE id = $1",
        queued.id,
    )
    await worker.run_once()  # sent: 3,450 s is inside the hour, less the margin
    [job] = (await service.get_plan(PlanRef(plan_id=created.id))).jobs
    assert job.status == "failed" and job.last_error.startswith("DELIVERY_OUTCOME_UNKNOWN"), job
    assert len(mastodon.instance.statuses) == 1


async def test_a_rejected_token_fails_the_job_at_once_without_showing_the_token(
    service: DistributionService, worker: Worker, mastodon: FakeMastodon
) -> None:
    item, target = await item_and_target(service, mastodon)
    mastodon.instance.token = "rotated-elsewhere"
    created = await plan(service, item.id, target.id)
    await worker.run_once()

    [job] = (await service.get_plan(PlanRef(plan_id=created.id))).jobs
    assert job.status == "failed" and job.attempt == 1
    [receipt] = (await service.get_receipts(PlanRef(plan_id=created.id))).receipts
    assert receipt.status_code == 401 and "access token is invalid" in receipt.error_message
    assert "accessToken" in receipt.error_message and "good-token" not in json.dumps(receipt.model_dump(mode="json"))


async def test_a_spent_rate_limit_suspends_the_target_until_its_reset(
    service: DistributionService, worker: Worker, mastodon: FakeMastodon
) -> None:
    item, target = await item_and_target(service, mastodon)
    mastodon.instance.remaining = 0
    mastodon.instance.reset_in = timedelta(minutes=3)
    created = await plan(service, item.id, target.id)
    await worker.run_once()

    [job] = (await service.get_plan(PlanRef(plan_id=created.id))).jobs
    assert job.status == "queued"
    [listed] = (await service.list_targets()).targets
    assert listed.suspended_until is not None
    assert timedelta(minutes=2) < listed.suspended_until - datetime.now(UTC) <= timedelta(minutes=3)
    assert mastodon.instance.statuses == []


async def test_a_long_body_is_cut_to_the_instances_limit_keeping_the_link(
    service: DistributionService, worker: Worker, mastodon: FakeMastodon
) -> None:
    body = " ".join(f"word{i}" for i in range(400))
    item, target = await item_and_target(service, mastodon, body=body)
    preview = await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id], dry_run=True)
    )
    [shown] = preview.previews
    assert (shown.limit, shown.truncated) == (500, True) and 480 < shown.length <= 500
    status = shown.payload["status"]
    assert status.endswith(f"…\n\n{LINK}") and "word3" in status

    await plan(service, item.id, target.id)
    await worker.run_once()
    [posted] = mastodon.instance.statuses
    assert posted["text"] == status, "what the dry run showed is what was posted"


async def test_an_instance_with_a_higher_limit_gets_a_longer_status(
    service: DistributionService, mastodon: FakeMastodon
) -> None:
    body = " ".join(f"word{i}" for i in range(400))
    item, target = await item_and_target(service, mastodon, body=body, maxCharacters=1000)
    preview = await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id], dry_run=True)
    )
    assert preview.previews[0].limit == 1000 and 980 < preview.previews[0].length <= 1000


async def test_an_instance_that_counts_less_than_the_target_says_fails_the_job_with_its_reason(
    service: DistributionService, worker: Worker, mastodon: FakeMastodon
) -> None:
    body = " ".join(f"word{i}" for i in range(400))
    item, target = await item_and_target(service, mastodon, body=body, maxCharacters=1000)
    created = await plan(service, item.id, target.id)
    await worker.run_once()
    [job] = (await service.get_plan(PlanRef(plan_id=created.id))).jobs
    assert job.status == "failed"
    assert "Text character limit of 500 exceeded" in job.last_error


@pytest.mark.parametrize(
    ("config", "secrets", "code"),
    [
        ({}, {"accessToken": "t"}, "INVALID_TARGET_CONFIG"),
        ({"baseUrl": "https://m.example", "visibility": "everyone"}, {"accessToken": "t"}, "INVALID_TARGET_CONFIG"),
        ({"baseUrl": "https://m.example", "maxCharacters": 0}, {"accessToken": "t"}, "INVALID_TARGET_CONFIG"),
        ({"baseUrl": "https://m.example"}, {}, "INVALID_TARGET_SECRETS"),
    ],
)
async def test_bad_targets_are_refused_at_registration(
    service: DistributionService, config: dict, secrets: dict, code: str
) -> None:
    with pytest.raises(DistributionError) as refused:
        await service.register_target(
            RegisterTargetInput(name="bad", channel_type="mastodon", config=config, secrets=secrets or None)
        )
    assert refused.value.code == code


def test_a_post_without_the_body_carries_the_title_summary_and_link() -> None:
    now = datetime.now(UTC)
    item = ContentItem(
        id=uuid.uuid4(),
        title="T",
        body="The whole, long body.",
        summary="Short.",
        canonical_url="https://e.com/p",
        metadata={},
        version=1,
        created_at=now,
        updated_at=now,
    )
    assert MastodonAdapter().transform(item, TransformPolicy(include_body=False)) == {
        "status": "T\n\nShort.\n\nhttps://e.com/p"
    }
    # With the body: its excerpt, never the whole body.
    no_summary = item.model_copy(update={"summary": None, "body": "First.\n\nSecond."})
    assert MastodonAdapter().transform(no_summary, TransformPolicy())["status"] == "T\n\nFirst.\n\nhttps://e.com/p"


async def test_a_default_policy_that_cannot_fit_is_refused_when_the_target_is_registered(
    service: DistributionService, mastodon: FakeMastodon
) -> None:
    with pytest.raises(DistributionError) as refused:
        await service.register_target(
            RegisterTargetInput(
                name="tiny",
                channel_type="mastodon",
                config={"baseUrl": mastodon.base_url, "maxCharacters": 40},
                secrets={"accessToken": "t"},
                transform_policy=TransformPolicy(hashtags=["launch", "release", "shipping", "news"]),
            )
        )
    assert refused.value.code == "POLICY_DOES_NOT_FIT" and "maxLength" in refused.value.remediation
    assert (await service.list_targets()).targets == []
