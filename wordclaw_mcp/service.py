"""The distribution service: the one layer that MCP tools (and later REST) call."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar
from uuid import UUID, uuid4

import anyio
import asyncpg
from pydantic import BaseModel, ValidationError

from . import access, errors, queries, text
from .access import LOCAL_AGENT, AccessService
from .database import transaction
from .models import (
    FINAL_PLAN_STATUSES,
    Agent,
    ContentItem,
    CreateDistributionPlanInput,
    Decision,
    Entitlement,
    Job,
    MyEntitlements,
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
# The unique index that keeps each feed target's file its own (schema.sql).
FEED_FILE_INDEX = "distribution_targets_feed_file"
# Waiters wake on NOTIFY; this is only the safety net for a lost notification.
AWAIT_POLL_SECONDS = 1.0
# Converting and cutting an item's text is CPU work in pure Python. For an item longer than
# OFF_LOOP_CHARS it runs in a worker thread, so that other sessions' calls are served meanwhile
# (a thread hop costs more than converting a short item); and all of one call's converting may
# take CONVERSION_SECONDS, after which the call fails with a coded error instead of running on.
OFF_LOOP_CHARS = 2_000
CONVERSION_SECONDS = 1.0

T = TypeVar("T")


class DistributionService:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.pool = runtime.pool
        self.adapters = runtime.adapters
        self.access = AccessService(runtime.pool)

    # --- content -------------------------------------------------------------------------------

    async def upsert_content_item(self, item: UpsertContentItemInput, *, agent: Agent = LOCAL_AGENT) -> ContentItem:
        body = item.body
        if item.body_format == "html":
            until = time.monotonic() + CONVERSION_SECONDS
            try:
                body = await _converting(until, len(body), partial(text.html_to_markdown, body))
            except text.TooComplex as exc:
                raise errors.DistributionError(
                    "VALIDATION_ERROR",
                    f"body: the HTML cannot be converted to Markdown: {exc}.",
                    f"Send simpler HTML (elements nested at most {text.MAX_HTML_DEPTH} deep, fewer tags), "
                    "or send the body as Markdown (bodyFormat: markdown).",
                ) from None
        values = (
            item.title,
            body,
            item.summary,
            str(item.canonical_url) if item.canonical_url else None,
            item.metadata,
        )
        if item.id is None:
            row = await self.pool.fetchrow(queries.INSERT_CONTENT_ITEM, *values, agent.tenant_id, agent.id)
        else:
            current = await self._content_item(item.id, agent)
            if current.created_by_agent_id != agent.id and not agent.may("admin"):
                raise errors.DistributionError(
                    "FORBIDDEN",
                    f"Content item {item.id} was created by another agent; only it, or an admin, may change it.",
                    "Create an item of your own with upsert_content_item (omit id), or ask the item's creator.",
                    requiredScope="admin",
                )
            row = await self.pool.fetchrow(queries.UPDATE_CONTENT_ITEM, item.id, *values, agent.tenant_id)
            if row is None:
                raise errors.content_item_not_found(item.id)
        return ContentItem.model_validate(dict(row))

    async def _content_item(self, content_item_id: UUID, agent: Agent) -> ContentItem:
        row = await self.pool.fetchrow(queries.GET_CONTENT_ITEM, content_item_id, agent.tenant_id)
        if row is None:
            raise errors.content_item_not_found(content_item_id)
        return ContentItem.model_validate(dict(row))

    # --- targets -------------------------------------------------------------------------------

    async def register_target(self, request: RegisterTargetInput, *, agent: Agent = LOCAL_AGENT) -> Target:
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
        config = adapter.config_for_tenant(config, agent.tenant_id)
        await adapter.check_target(config)
        if request.transform_policy:
            self._check_policy_fits(adapter, request)
        # Secret parts of the config (a token in a URL) are encrypted with the secrets, and only
        # the redacted rest is stored in clear and shown.
        sealed = adapter.seal_config(config.model_dump(mode="json", by_alias=True, exclude_unset=True))
        secrets = {**secrets, **sealed.secrets}
        target_id = uuid4()  # chosen here: the secrets are sealed for this row before it exists
        binding = target_binding(target_id)
        try:
            row = await self.pool.fetchrow(
                queries.INSERT_TARGET,
                target_id,
                request.name,
                request.channel_type,
                sealed.config,
                self.runtime.secrets.encrypt(secrets, bound_to=binding) if secrets else None,
                request.max_concurrency or adapter.default_max_concurrency,
                request.rate_per_minute or adapter.default_rate_per_minute,
                # Only the fields given, so that a plan's policy can win over them one by one.
                request.transform_policy.model_dump(mode="json", by_alias=True, exclude_unset=True)
                if request.transform_policy
                else None,
                agent.tenant_id,
                self.runtime.secrets.fingerprint(secrets, bound_to=binding) if secrets else None,
                # The policy check_target applied: workers deliver the target under it, with or without
                # WORDCLAW_ALLOW_PRIVATE_TARGETS of their own.
                adapter.options.allow_private_targets,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != FEED_FILE_INDEX:
                raise
            raise _feed_file_taken(sealed.config) from None
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

    async def rotate_target_secret(
        self, request: RotateTargetSecretInput, *, agent: Agent = LOCAL_AGENT
    ) -> SecretRotation:
        """A new secret for a target, shown once; the old one stays valid for the grace period."""
        row = await self.pool.fetchrow(queries.GET_TARGET_SECRETS, request.target_id, agent.tenant_id)
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
            queries.UPDATE_TARGET_SECRETS,
            request.target_id,
            self.runtime.secrets.encrypt(stored, bound_to=binding),
            self.runtime.secrets.fingerprint(stored, bound_to=binding),
        )
        kept = until if until and any(key not in shown for key in stored if key.startswith("previous")) else None
        return SecretRotation(target_id=request.target_id, secrets=shown, previous_valid_until=kept)

    async def read_feed(self, target_id: UUID, *, agent: Agent = LOCAL_AGENT) -> str:
        """A feed target's current feed (the MCP resource ``feed://{targetId}``)."""
        row = await self.pool.fetchrow(queries.GET_FEED_TARGET, target_id, agent.tenant_id)
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

    async def list_targets(self, *, agent: Agent = LOCAL_AGENT) -> TargetList:
        rows = await self.pool.fetch(queries.LIST_TARGETS, agent.tenant_id)
        targets = [Target.model_validate(dict(row)) for row in rows]
        for target in targets:
            # Rows stored before configs were sealed may still hold a token; never show it.
            if target.channel_type in self.adapters.channel_types:
                target.config = self.adapters.get(target.channel_type).seal_config(target.config).config
        return TargetList(targets=targets)

    async def _plan_inputs(
        self, request: CreateDistributionPlanInput, agent: Agent
    ) -> tuple[ContentItem, list[Target]]:
        """The plan's content item and targets, in the order given, or the error that stops it."""
        target_ids = request.target_ids
        row = await self.pool.fetchrow(queries.GET_PLAN_INPUTS, request.content_item_id, target_ids, agent.tenant_id)
        if row["item"] is None:
            raise errors.content_item_not_found(request.content_item_id)
        content = ContentItem.model_validate(row["item"])
        found = {target.id: target for target in (Target.model_validate(value) for value in row["targets"])}
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
                "Remove it from targetIds; to deliver there again, register the destination as a new target.",
                inactiveTargetIds=inactive,
            )
        return content, [found[target_id] for target_id in target_ids]

    # --- plans ---------------------------------------------------------------------------------

    async def create_distribution_plan(
        self, request: CreateDistributionPlanInput, *, agent: Agent = LOCAL_AGENT
    ) -> Plan:
        policy = request.transform_policy or TransformPolicy()
        content, targets = await self._plan_inputs(request, agent)
        grants = [] if content.created_by_agent_id == agent.id else await self.access.grants_for(agent, content.id)
        verdicts, policies, seen = [], [], []
        # The item as each grant lets it be seen (an excerpt-only grant bounds every field), made
        # once per grant that bounds it: None stands for the item as it is.
        views: dict[UUID | None, ContentItem] = {None: content}
        bounding: dict[UUID, Entitlement] = {}
        for target in targets:
            merged = policy.over(target.transform_policy)
            verdict = access.decide(agent, content, target.channel_type, merged, grants)
            verdicts.append(verdict)
            adapter = self.adapters.get(target.channel_type)
            policies.append(adapter.policy_for(target.config, access.entitled_policy(merged, verdict.grant)))
            view = verdict.grant.id if verdict.grant is not None and verdict.grant.excerpt_only else None
            if view is not None:
                bounding[view] = verdict.grant
            seen.append(view)
        until, size = time.monotonic() + CONVERSION_SECONDS, _text_size(content)
        for view, grant in bounding.items():
            try:
                views[view] = await _converting(until, size, partial(access.entitled_content, content, grant))
            except text.TooComplex as exc:
                raise _too_complex(content, exc) from None
        denied = [(target, verdict) for target, verdict in zip(targets, verdicts, strict=True) if not verdict.allowed]
        if denied and not request.dry_run:
            await self._log_decisions(agent, content, targets, verdicts, "plan")
            raise _denial(denied)

        # A transform depends on the channel, the item and the policy, not on the target: each
        # is made once, however many targets of one channel and policy the plan names.
        # A denied target's payload is not made: a dry run must not show an agent the content it
        # may not distribute.
        made: dict[tuple[str, str, UUID | None], dict[str, Any]] = {}
        payloads: list[dict[str, Any]] = []
        for target, effective, verdict, view in zip(targets, policies, verdicts, seen, strict=True):
            if not verdict.allowed:
                payloads.append({})
                continue
            key = (target.channel_type, effective.model_dump_json(), view)
            if key not in made:
                try:
                    transform = partial(self.adapters.get(target.channel_type).transform, views[view], effective)
                    made[key] = await _converting(until, size, transform)
                except text.TooComplex as exc:
                    raise _too_complex(content, exc) from None
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
            await self._log_decisions(agent, content, targets, verdicts, "dry_run")
            # Where an excerpt-only grant cut the excerpt, before any channel cut it again.
            excerpts = {
                view: access.excerpt_cut(content, verdict.grant) for view, verdict in zip(seen, verdicts, strict=True)
            }

            def previews() -> list[Preview]:
                return [
                    self._preview(target, payload, views[view], effective, verdict.decision, excerpts[view])
                    for target, payload, effective, verdict, view in zip(
                        targets, payloads, policies, verdicts, seen, strict=True
                    )
                ]

            try:
                shown = await _converting(until, size, previews)
            except text.TooComplex as exc:
                raise _too_complex(content, exc) from None
            return Plan(
                id=None,
                content_item_id=content.id,
                content_version=content.version,
                status="dry_run",
                previews=shown,
            )
        plan = await self._queue_plan(request, agent, content, targets, payloads, verdicts)
        if request.await_delivery:
            return await self.await_plan(plan.id, AWAIT_DELIVERY_SECONDS, agent=agent)
        return plan

    async def _queue_plan(
        self,
        request: CreateDistributionPlanInput,
        agent: Agent,
        content: ContentItem,
        targets: list[Target],
        payloads: list[dict[str, Any]],
        verdicts: list[access.Verdict],
    ) -> Plan:
        """Queue the plan in one transaction, under the locks of the duplicate and idempotency
        rules (LOCK_PLAN_KEYS): the same item and target, or the same key, are planned one at a time.

        A plan with neither rule to keep (allowDuplicate and no key) and no grant to spend is one
        statement, with no transaction around it.
        """
        key = request.idempotency_key
        digest = request_digest(request) if key is not None else None
        spend = Counter(verdict.grant.id for verdict in verdicts if verdict.grant is not None)
        target_ids = [target.id for target in targets]
        locked = not request.allow_duplicate or key is not None
        async with self.pool.acquire() as conn, _transaction(conn, locked or bool(spend)):
            if locked:
                await conn.fetchval(queries.LOCK_PLAN_KEYS, agent.tenant_id, content.id, target_ids, agent.id, key)
            if key is not None:
                earlier = await conn.fetchrow(queries.FIND_IDEMPOTENT_PLAN, agent.id, key)
                if earlier is not None:
                    if earlier["request_digest"] != digest:
                        raise _key_reused(key, earlier["id"])
                    # On this connection: waiting for a second one while holding the first could
                    # leave every pooled connection waiting on another.
                    return await self._plan(earlier["id"], agent, conn)
            if spend:
                spent = await conn.fetch(queries.SPEND_ENTITLEMENTS, list(spend), list(spend.values()))
                if unspent := sorted(set(spend) - {row["id"] for row in spent}):
                    failed = await conn.fetchrow(queries.GET_ENTITLEMENTS, unspent[:1])
                    raise access.spend_failure(Entitlement.model_validate(dict(failed)), content)
            distinct, picks = each_once(payloads)
            row = await conn.fetchrow(
                queries.CREATE_PLAN,
                content.id,
                content.version,
                agent.id,
                {
                    "transformPolicy": (request.transform_policy or TransformPolicy()).model_dump(
                        mode="json", by_alias=True
                    ),
                    "allowDuplicate": request.allow_duplicate,
                },
                self.settings.max_attempts,
                target_ids,
                distinct,
                1 if request.await_delivery else 0,  # someone waits: ahead of the backlog
                request.allow_duplicate,
                agent.tenant_id,
                key,
                digest,
                [verdict.grant.id if verdict.grant else None for verdict in verdicts],
                [target.channel_type for target in targets],
                [verdict.decision.code for verdict in verdicts],
                picks,
            )
            if row["id"] is None:
                raise _duplicate(content.id, row["duplicates"])
        return Plan.model_validate({column: value for column, value in row.items() if column != "duplicates"})

    async def _log_decisions(
        self, agent: Agent, content: ContentItem, targets: list[Target], verdicts: list[access.Verdict], stage: str
    ) -> None:
        await self.pool.execute(
            queries.LOG_DECISIONS,
            agent.tenant_id,
            agent.id,
            content.id,
            stage,
            [target.id for target in targets],
            [target.channel_type for target in targets],
            [verdict.decision.outcome for verdict in verdicts],
            [verdict.decision.code for verdict in verdicts],
            [verdict.decision.entitlement_id for verdict in verdicts],
        )

    async def get_my_entitlements(self, *, agent: Agent = LOCAL_AGENT) -> MyEntitlements:
        return MyEntitlements(agent=agent, entitlements=await self.access.list_entitlements(agent.id))

    def _preview(
        self,
        target: Target,
        payload: dict[str, Any],
        content: ContentItem,
        policy: TransformPolicy,
        decision: Decision,
        excerpt: text.Cut | None,
    ) -> Preview:
        """What ``target`` would get of ``content`` (the item as the caller's grant lets it be seen),
        and how it was cut: by the channel, or else by the grant (``excerpt``)."""
        if decision.outcome == "deny":
            return Preview(target_id=target.id, channel_type=target.channel_type, payload={}, decision=decision)
        fit = self.adapters.get(target.channel_type).fit(content, policy)
        measured: dict[str, Any] = (
            {} if fit is None else {"length": fit.length, "limit": fit.limit, "truncated": fit.truncated}
        )
        cut_at = fit.cut_at if fit else None
        if excerpt is not None and excerpt.truncated and not measured.get("truncated"):
            measured["truncated"], cut_at = True, excerpt.cut_at
        return Preview(
            target_id=target.id,
            channel_type=target.channel_type,
            payload=payload,
            cut_at=cut_at,
            decision=decision,
            **measured,
        )

    async def get_plan(self, ref: PlanRef, *, agent: Agent = LOCAL_AGENT) -> Plan:
        return await self._plan(ref.plan_id, agent)

    async def cancel_plan(self, ref: PlanRef, *, agent: Agent = LOCAL_AGENT) -> Plan:
        await self._require_plan(ref.plan_id, agent)
        await self.pool.execute(queries.CANCEL_PLAN, ref.plan_id)
        return await self._plan(ref.plan_id, agent)

    async def retry_plan(self, request: RetryPlanInput, *, agent: Agent = LOCAL_AGENT) -> Plan:
        """Drive a plan's failed jobs (all, or those listed) again, each with a fresh attempt budget."""
        await self._require_plan(request.plan_id, agent)
        if request.job_ids is not None:
            await self._check_retryable(request.plan_id, request.job_ids)
            await self.redrive(job_ids=request.job_ids)
        else:
            await self.redrive(plan_id=request.plan_id)
        return await self._plan(request.plan_id, agent)

    async def redrive(
        self, *, job_ids: list[UUID] | None = None, plan_id: UUID | None = None, target_id: UUID | None = None
    ) -> list[UUID]:
        """Requeue failed jobs (by id, of a plan, or of a target) with a fresh budget; their ids.

        Old receipts stay. Jobs of an inactive target stay failed: they could never be claimed.
        """
        rows = await self.pool.fetch(
            queries.REDRIVE_JOBS, job_ids or [], plan_id, target_id, self.settings.max_attempts
        )
        if not rows:
            await self._require_redrive_subjects(job_ids or [], plan_id, target_id)
        return [row["id"] for row in rows]

    async def _require_redrive_subjects(
        self, job_ids: list[UUID], plan_id: UUID | None, target_id: UUID | None
    ) -> None:
        """A redrive that queued nothing: an error if what it named does not exist, rather than "0 queued"."""
        found = await self.pool.fetchrow(queries.REDRIVE_SUBJECTS, job_ids, plan_id, target_id)
        if plan_id is not None and not found["plan_exists"]:
            raise errors.plan_not_found(plan_id)
        if target_id is not None and not found["target_exists"]:
            raise errors.target_not_found(target_id)
        if missing := sorted(set(map(str, job_ids)) - set(map(str, found["job_ids"]))):
            raise errors.DistributionError(
                "JOB_NOT_FOUND",
                f"No distribution job with id {missing[0]} exists.",
                "Use a job id that get_plan shows, or redrive the whole plan (--plan).",
                missingJobIds=missing,
            )

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

    async def get_receipts(self, ref: PlanRef, *, agent: Agent = LOCAL_AGENT) -> ReceiptList:
        await self._require_plan(ref.plan_id, agent)
        return ReceiptList(plan_id=ref.plan_id, receipts=await self._receipts(ref.plan_id))

    async def await_plan(self, plan_id: UUID, wait_seconds: float, *, agent: Agent = LOCAL_AGENT) -> Plan:
        """The plan once every job is final, or as it stands after ``wait_seconds``."""
        woken = anyio.Event()
        key = str(plan_id)

        def on_change(payload: str) -> None:
            if payload == key:
                woken.set()

        with self.runtime.notifications.subscribe(PLANS_CHANNEL, on_change), anyio.move_on_after(wait_seconds):
            # Subscribed before the first read, so a change between read and wait still wakes us.
            while (
                await self.pool.fetchval(queries.GET_PLAN_STATUS, plan_id, agent.tenant_id) not in FINAL_PLAN_STATUSES
            ):
                await self.runtime.notifications.ensure()
                with anyio.move_on_after(AWAIT_POLL_SECONDS):
                    await woken.wait()
                woken = anyio.Event()
        plan = await self._plan(plan_id, agent)
        plan.receipts = await self._receipts(plan_id)
        plan.await_timed_out = plan.status not in FINAL_PLAN_STATUSES
        return plan

    async def _require_plan(self, plan_id: UUID, agent: Agent) -> None:
        if await self.pool.fetchval(queries.GET_PLAN_STATUS, plan_id, agent.tenant_id) is None:
            raise errors.plan_not_found(plan_id)

    async def _plan(self, plan_id: UUID, agent: Agent, conn: asyncpg.Connection | None = None) -> Plan:
        """The plan and its jobs, read on ``conn`` if given (one the caller already holds), else the pool."""
        source = conn or self.pool
        row = await source.fetchrow(queries.GET_PLAN, plan_id, agent.tenant_id)
        if row is None:
            raise errors.plan_not_found(plan_id)
        jobs = await source.fetch(queries.GET_PLAN_JOBS, plan_id)
        return Plan.model_validate({**row, "jobs": [Job.model_validate(dict(job)) for job in jobs]})

    async def _receipts(self, plan_id: UUID) -> list[Receipt]:
        rows = await self.pool.fetch(queries.GET_PLAN_RECEIPTS, plan_id)
        return [Receipt.model_validate(dict(row)) for row in rows]


async def _converting(until: float, size: int, work: Callable[[], T]) -> T:
    """``work`` (converting or cutting text ``size`` characters long) under the deadline ``until``:
    in a worker thread when the text is long, else at once."""

    def run() -> T:
        with text.deadline(until):
            return work()

    return await anyio.to_thread.run_sync(run) if size > OFF_LOOP_CHARS else run()


def each_once(payloads: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """CREATE_PLAN's payloads: each distinct one once (the plan's transforms are shared objects),
    and which one each target gets, 1-based."""
    distinct: list[dict[str, Any]] = []
    index: dict[int, int] = {}
    picks = []
    for payload in payloads:
        if id(payload) not in index:
            distinct.append(payload)
            index[id(payload)] = len(distinct)
        picks.append(index[id(payload)])
    return distinct, picks


def _text_size(content: ContentItem) -> int:
    return len(content.title) + len(content.body) + len(content.summary or "") + _metadata_size(content.metadata)


def _metadata_size(metadata: dict[str, Any]) -> int:
    """Metadata counts too: an excerpt grant cuts every string in it. Stored metadata nested past
    what the encoder follows counts as long."""
    try:
        return len(json.dumps(metadata, ensure_ascii=False)) if metadata else 0
    except (RecursionError, ValueError):
        return OFF_LOOP_CHARS + 1


def _too_complex(content: ContentItem, exc: text.TooComplex) -> errors.DistributionError:
    return errors.DistributionError(
        "CONTENT_TOO_COMPLEX",
        f"Content item {content.id} cannot be converted for its channels in time: {exc}.",
        "Shorten the item's body or simplify its markup (fewer links, lines and tags), or make the plan "
        "without the body (transformPolicy.includeBody: false).",
        contentItemId=str(content.id),
    )


def _validate_part(model: type[BaseModel], value: dict[str, Any], name: str, code: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise errors.DistributionError(
            code,
            f"The target's {name} is not valid: {errors.describe_validation(exc.errors(), name)}.",
            f"Correct {name} and call register_target again.",
        ) from exc


@asynccontextmanager
async def _transaction(conn: asyncpg.Connection, needed: bool) -> AsyncIterator[None]:
    """A transaction on ``conn`` when ``needed``; otherwise each statement commits on its own."""
    if not needed:
        yield
        return
    async with transaction(conn):
        yield


def request_digest(request: CreateDistributionPlanInput) -> str:
    """What an idempotency key is bound to: the arguments that shape the plan (not how long the
    caller waits for it)."""
    shaping = request.model_dump(
        mode="json",
        by_alias=True,
        exclude_unset=True,
        include={"content_item_id", "target_ids", "transform_policy", "allow_duplicate"},
    )
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def _denial(denied: list[tuple[Target, access.Verdict]]) -> errors.DistributionError:
    """The first denial, naming every target that was denied and why."""
    error = denied[0][1].error
    assert error is not None
    error.details["targetId"] = str(denied[0][0].id)
    error.details["deniedTargets"] = [
        {"targetId": str(target.id), "channelType": target.channel_type, "code": verdict.decision.code}
        for target, verdict in denied
    ]
    return error


def _feed_file_taken(config: dict[str, Any]) -> errors.DistributionError:
    return errors.DistributionError(
        "FEED_PATH_TAKEN",
        f"Another feed target already writes the file {config.get('file')!r} (path {config.get('path')!r}); "
        "two feeds cannot share a file.",
        "Register this feed under another path, or deliver to the target that has it (list_targets shows "
        "each feed's file; a deactivated target keeps its file too).",
        file=config.get("file"),
    )


def _duplicate(content_item_id: UUID, duplicates: list[dict[str, Any]]) -> errors.DistributionError:
    first = duplicates[0]
    targets = sorted({target for duplicate in duplicates for target in duplicate["targetIds"]})
    return errors.DistributionError(
        "DUPLICATE_DISTRIBUTION_PLAN",
        f"Plan {first['planId']} already distributes content item {content_item_id} to target(s) "
        f"{', '.join(targets)}, and was made less than 5 minutes ago.",
        "Follow that plan with get_plan (retry_plan drives its failed jobs again), leave those targets out, "
        "or set allowDuplicate: true to distribute again on purpose.",
        existingPlanId=first["planId"],
        duplicatePlans=duplicates,
        targetIds=targets,
    )


def _key_reused(key: str, plan_id: UUID) -> errors.DistributionError:
    return errors.DistributionError(
        "IDEMPOTENCY_KEY_REUSED",
        f"The idempotency key {key!r} was used in the last 24 hours for plan {plan_id}, with other arguments.",
        "Repeat the call with exactly its first arguments to get that plan back, or use a new key for a new plan.",
        existingPlanId=str(plan_id),
    )
