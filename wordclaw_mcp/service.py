"""The distribution service: the one layer that MCP tools (and later REST) call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import anyio
from pydantic import BaseModel, ValidationError

from . import errors, queries, text
from .models import (
    FINAL_PLAN_STATUSES,
    ContentItem,
    CreateDistributionPlanInput,
    Job,
    Plan,
    PlanRef,
    Preview,
    Receipt,
    ReceiptList,
    RegisterTargetInput,
    RetryPlanInput,
    RotateTargetSecretInput,
    SecretRotation,
    Target,
    TargetList,
    TransformPolicy,
    UpsertContentItemInput,
)
from .notifications import PLANS_CHANNEL
from .runtime import Runtime
from .secrets import target_binding

AWAIT_DELIVERY_SECONDS = 10.0
# Waiters wake on NOTIFY; this is only the safety net for a lost notification.
AWAIT_POLL_SECONDS = 1.0


class DistributionService:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.pool = runtime.pool
        self.adapters = runtime.adapters

    # --- content -------------------------------------------------------------------------------

    async def upsert_content_item(self, item: UpsertContentItemInput) -> ContentItem:
        values = (
            item.title,
            text.html_to_markdown(item.body) if item.body_format == "html" else item.body,
            item.summary,
            str(item.canonical_url) if item.canonical_url else None,
            item.metadata,
        )
        if item.id is None:
            row = await self.pool.fetchrow(queries.INSERT_CONTENT_ITEM, *values)
        else:
            row = await self.pool.fetchrow(queries.UPDATE_CONTENT_ITEM, item.id, *values)
            if row is None:
                raise errors.content_item_not_found(item.id)
        return ContentItem.model_validate(dict(row))

    async def _content_item(self, content_item_id: UUID) -> ContentItem:
        row = await self.pool.fetchrow(queries.GET_CONTENT_ITEM, content_item_id)
        if row is None:
            raise errors.content_item_not_found(content_item_id)
        return ContentItem.model_validate(dict(row))

    # --- targets -------------------------------------------------------------------------------

    async def register_target(self, request: RegisterTargetInput) -> Target:
        adapter = self.adapters.get(request.channel_type)
        config = _validate_part(adapter.config_model, request.config, "config", "INVALID_TARGET_CONFIG")
        secrets: dict[str, str] = {}
        if request.secrets or adapter.secrets_required:
            if adapter.secrets_model is None:
                raise errors.DistributionError(
                    "INVALID_TARGET_SECRETS",
                    f"Channel type {request.channel_type!r} takes no secrets.",
                    "Call register_target again without secrets.",
                )
            given = request.secrets or {}
            validated = _validate_part(adapter.secrets_model, given, "secrets", "INVALID_TARGET_SECRETS")
            secrets = validated.model_dump(mode="json", by_alias=True, exclude_none=True)
        generated = adapter.generate_secrets(secrets)
        secrets |= generated
        await adapter.check_target(config)
        if request.transform_policy:
            self._check_policy_fits(adapter, request)
        # Secret parts of the config (a token in a URL) are encrypted with the secrets, and only
        # the redacted rest is stored in clear and shown.
        sealed = adapter.seal_config(config.model_dump(mode="json", by_alias=True, exclude_unset=True))
        secrets = {**secrets, **sealed.secrets}
        target_id = uuid4()  # chosen here: the secrets are sealed for this row before it exists
        row = await self.pool.fetchrow(
            queries.INSERT_TARGET,
            target_id,
            request.name,
            request.channel_type,
            sealed.config,
            self.runtime.secrets.encrypt(secrets, bound_to=target_binding(target_id)) if secrets else None,
            request.max_concurrency or adapter.default_max_concurrency,
            request.rate_per_minute or adapter.default_rate_per_minute,
            # Only the fields given, so that a plan's policy can win over them one by one.
            request.transform_policy.model_dump(mode="json", by_alias=True, exclude_unset=True)
            if request.transform_policy
            else None,
        )
        if row is None:
            raise errors.DistributionError(
                "TARGET_NAME_TAKEN",
                f"A target named {request.name!r} already exists.",
                "Call list_targets to find its id, or register under another name.",
            )
        return Target.model_validate({**row, "generated_secrets": generated or None})

    def _check_policy_fits(self, adapter: Any, request: RegisterTargetInput) -> None:
        """Refuse a default policy whose kept parts (hashtags, attribution, a link) cannot fit the
        channel's post even around the shortest item, rather than fail every plan later."""
        assert request.transform_policy is not None
        now = datetime.now(UTC)
        probe = ContentItem(
            id=UUID(int=0),
            title="T",
            body="",
            summary=None,
            canonical_url="https://example.com/",
            metadata={"author": "A", "license": "L"},
            version=1,
            created_at=now,
            updated_at=now,
        )
        policy = adapter.policy_for(request.config, request.transform_policy)
        try:
            adapter.transform(probe, policy)
        except text.DoesNotFit as exc:
            raise errors.DistributionError(
                "POLICY_DOES_NOT_FIT",
                f"This target's transform policy cannot fit a {request.channel_type} post: {exc}.",
                "Raise maxLength (or the target's own limit), or drop hashtags, includeAttribution or "
                "includeCanonicalUrl from the policy.",
            ) from None

    async def rotate_target_secret(self, request: RotateTargetSecretInput) -> SecretRotation:
        """A new secret for a target, shown once; the old one stays valid for the grace period."""
        row = await self.pool.fetchrow(queries.GET_TARGET_SECRETS, request.target_id)
        if row is None:
            raise errors.target_not_found(request.target_id)
        adapter = self.adapters.get(row["channel_type"])
        binding = target_binding(request.target_id)
        current = (
            self.runtime.secrets.decrypt(row["secret_ciphertext"], bound_to=binding) if row["secret_ciphertext"] else {}
        )
        until = datetime.now(UTC) + timedelta(hours=request.grace_hours) if request.grace_hours else None
        stored, shown = adapter.rotate_secrets(current, until)
        await self.pool.execute(
            queries.UPDATE_TARGET_SECRETS, request.target_id, self.runtime.secrets.encrypt(stored, bound_to=binding)
        )
        kept = until if until and any(key not in shown for key in stored if key.startswith("previous")) else None
        return SecretRotation(target_id=request.target_id, secrets=shown, previous_valid_until=kept)

    async def read_feed(self, target_id: UUID) -> str:
        """A feed target's current feed (the MCP resource ``feed://{targetId}``)."""
        row = await self.pool.fetchrow(queries.GET_FEED_TARGET, target_id)
        if row is None:
            raise errors.target_not_found(target_id)
        published = await self.adapters.get(row["channel_type"]).read(target_id, row["config"])
        if published is None:
            raise errors.DistributionError(
                "TARGET_NOT_A_FEED",
                f"Target {target_id} is a {row['channel_type']} target, which publishes nothing to read.",
                "Read feed://{targetId} for rss and atom targets only (list_targets shows each channelType).",
            )
        return published

    async def list_targets(self) -> TargetList:
        rows = await self.pool.fetch(queries.LIST_TARGETS)
        targets = [Target.model_validate(dict(row)) for row in rows]
        for target in targets:
            # Rows stored before configs were sealed may still hold a token; never show it.
            if target.channel_type in self.adapters.channel_types:
                target.config = self.adapters.get(target.channel_type).seal_config(target.config).config
        return TargetList(targets=targets)

    async def _targets(self, target_ids: list[UUID]) -> list[Target]:
        rows = await self.pool.fetch(queries.GET_TARGETS, target_ids)
        found = {row["id"]: Target.model_validate(dict(row)) for row in rows}
        missing = [target_id for target_id in target_ids if target_id not in found]
        if missing:
            error = errors.target_not_found(missing[0])
            error.details["missingTargetIds"] = [str(target_id) for target_id in missing]
            raise error
        inactive = [str(target_id) for target_id in target_ids if not found[target_id].active]
        if inactive:
            raise errors.DistributionError(
                "TARGET_INACTIVE",
                f"Target {inactive[0]} is deactivated.",
                "Remove it from targetIds or reactivate it.",
                inactiveTargetIds=inactive,
            )
        return [found[target_id] for target_id in target_ids]

    # --- plans ---------------------------------------------------------------------------------

    async def create_distribution_plan(
        self, request: CreateDistributionPlanInput, *, agent_id: str | None = None
    ) -> Plan:
        agent_id = agent_id or self.settings.agent_id
        policy = request.transform_policy or TransformPolicy()
        content = await self._content_item(request.content_item_id)
        targets = await self._targets(request.target_ids)
        policies = [
            self.adapters.get(target.channel_type).policy_for(target.config, policy.over(target.transform_policy))
            for target in targets
        ]
        # A transform depends on the channel, the item and the policy, not on the target: each
        # is made once, however many targets of one channel and policy the plan names.
        made: dict[tuple[str, str], dict[str, Any]] = {}
        payloads = []
        for target, effective in zip(targets, policies, strict=True):
            key = (target.channel_type, effective.model_dump_json())
            if key not in made:
                try:
                    made[key] = self.adapters.get(target.channel_type).transform(content, effective)
                except text.DoesNotFit as exc:
                    raise errors.DistributionError(
                        "POLICY_DOES_NOT_FIT",
                        f"For target {target.id} ({target.channel_type}), {exc}.",
                        "Raise maxLength (or the target's own limit), or drop hashtags, includeAttribution or "
                        "includeCanonicalUrl from the transform policy.",
                        targetId=str(target.id),
                    ) from None
            payloads.append(made[key])

        if request.dry_run:
            return Plan(
                id=None,
                content_item_id=content.id,
                content_version=content.version,
                status="dry_run",
                previews=[
                    self._preview(target, payload, content, effective)
                    for target, payload, effective in zip(targets, payloads, policies, strict=True)
                ],
            )

        options = {"transformPolicy": policy.model_dump(mode="json", by_alias=True)}
        row = await self.pool.fetchrow(
            queries.CREATE_PLAN,
            content.id,
            content.version,
            agent_id,
            options,
            self.settings.max_attempts,
            [target.id for target in targets],
            payloads,
            1 if request.await_delivery else 0,  # someone waits: ahead of the backlog
        )
        if request.await_delivery:
            return await self.await_plan(row["id"], AWAIT_DELIVERY_SECONDS)
        return Plan.model_validate(dict(row))

    def _preview(
        self, target: Target, payload: dict[str, Any], content: ContentItem, policy: TransformPolicy
    ) -> Preview:
        fit = self.adapters.get(target.channel_type).fit(content, policy)
        measured = {} if fit is None else {"length": fit.length, "limit": fit.limit, "truncated": fit.truncated}
        return Preview(
            target_id=target.id,
            channel_type=target.channel_type,
            payload=payload,
            cut_at=fit.cut_at if fit else None,
            **measured,
        )

    async def get_plan(self, ref: PlanRef) -> Plan:
        return await self._plan(ref.plan_id)

    async def cancel_plan(self, ref: PlanRef) -> Plan:
        await self._require_plan(ref.plan_id)
        await self.pool.execute(queries.CANCEL_PLAN, ref.plan_id)
        return await self._plan(ref.plan_id)

    async def retry_plan(self, request: RetryPlanInput) -> Plan:
        """Drive a plan's failed jobs (all, or those listed) again, each with a fresh attempt budget."""
        await self._require_plan(request.plan_id)
        if request.job_ids is not None:
            await self._check_retryable(request.plan_id, request.job_ids)
            await self.redrive(job_ids=request.job_ids)
        else:
            await self.redrive(plan_id=request.plan_id)
        return await self._plan(request.plan_id)

    async def redrive(
        self, *, job_ids: list[UUID] | None = None, plan_id: UUID | None = None, target_id: UUID | None = None
    ) -> list[UUID]:
        """Requeue failed jobs (by id, of a plan, or of a target) with a fresh budget; their ids.

        Old receipts stay. Jobs of an inactive target stay failed: they could never be claimed.
        """
        rows = await self.pool.fetch(
            queries.REDRIVE_JOBS, job_ids or [], plan_id, target_id, self.settings.max_attempts
        )
        return [row["id"] for row in rows]

    async def list_workers(self) -> list[dict[str, Any]]:
        """The workers that registered and have not stopped cleanly, with their last heartbeat."""
        return [dict(row) for row in await self.pool.fetch(queries.LIST_WORKERS)]

    async def _check_retryable(self, plan_id: UUID, job_ids: list[UUID]) -> None:
        found = {row["id"]: row for row in await self.pool.fetch(queries.GET_JOBS, job_ids)}
        missing = [str(job_id) for job_id in job_ids if job_id not in found or found[job_id]["plan_id"] != plan_id]
        if missing:
            raise errors.DistributionError(
                "JOB_NOT_FOUND",
                f"Plan {plan_id} has no job {missing[0]}.",
                "Use job ids from get_plan for this plan, or omit jobIds to retry every failed job.",
                missingJobIds=missing,
            )
        not_failed = {str(job_id): found[job_id]["status"] for job_id in job_ids if found[job_id]["status"] != "failed"}
        if not_failed:
            raise errors.DistributionError(
                "JOB_NOT_FAILED",
                f"Only failed jobs can be retried; {len(not_failed)} of those named are not failed.",
                "Leave out jobs that are queued, running, succeeded or cancelled (get_plan shows each job's status).",
                jobStatuses=not_failed,
            )
        inactive = [str(job_id) for job_id in job_ids if not found[job_id]["target_active"]]
        if inactive:
            raise errors.DistributionError(
                "TARGET_INACTIVE",
                f"Job {inactive[0]} delivers to a deactivated target, so it could never be claimed.",
                "Leave it out, or register the destination again as a new target and create a new plan.",
                inactiveJobIds=inactive,
            )

    async def get_receipts(self, ref: PlanRef) -> ReceiptList:
        await self._require_plan(ref.plan_id)
        return ReceiptList(plan_id=ref.plan_id, receipts=await self._receipts(ref.plan_id))

    async def await_plan(self, plan_id: UUID, wait_seconds: float) -> Plan:
        """The plan once every job is final, or as it stands after ``wait_seconds``."""
        woken = anyio.Event()
        key = str(plan_id)

        def on_change(payload: str) -> None:
            if payload == key:
                woken.set()

        with self.runtime.notifications.subscribe(PLANS_CHANNEL, on_change), anyio.move_on_after(wait_seconds):
            # Subscribed before the first read, so a change between read and wait still wakes us.
            while await self.pool.fetchval(queries.GET_PLAN_STATUS, plan_id) not in FINAL_PLAN_STATUSES:
                await self.runtime.notifications.ensure()
                with anyio.move_on_after(AWAIT_POLL_SECONDS):
                    await woken.wait()
                woken = anyio.Event()
        plan = await self._plan(plan_id)
        plan.receipts = await self._receipts(plan_id)
        plan.await_timed_out = plan.status not in FINAL_PLAN_STATUSES
        return plan

    async def _require_plan(self, plan_id: UUID) -> None:
        if await self.pool.fetchval(queries.GET_PLAN_STATUS, plan_id) is None:
            raise errors.plan_not_found(plan_id)

    async def _plan(self, plan_id: UUID) -> Plan:
        row = await self.pool.fetchrow(queries.GET_PLAN, plan_id)
        if row is None:
            raise errors.plan_not_found(plan_id)
        jobs = await self.pool.fetch(queries.GET_PLAN_JOBS, plan_id)
        return Plan.model_validate({**row, "jobs": [Job.model_validate(dict(job)) for job in jobs]})

    async def _receipts(self, plan_id: UUID) -> list[Receipt]:
        rows = await self.pool.fetch(queries.GET_PLAN_RECEIPTS, plan_id)
        return [Receipt.model_validate(dict(row)) for row in rows]


def _validate_part(model: type[BaseModel], value: dict[str, Any], name: str, code: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise errors.DistributionError(
            code,
            f"The target's {name} is not valid: {errors.describe_validation(exc.errors(), name)}.",
            f"Correct {name} and call register_target again.",
        ) from exc
