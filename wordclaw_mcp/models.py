"""Tool inputs and outputs. The wire is camelCase; Python attributes are snake_case."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, get_args
from uuid import UUID

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, HttpUrl, field_validator
from pydantic.alias_generators import to_camel

PlanStatus = Literal["queued", "running", "succeeded", "partial", "failed", "cancelled"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

FINAL_PLAN_STATUSES: frozenset[str] = frozenset({"succeeded", "partial", "failed", "cancelled"})

Scope = Literal["distribution:read", "distribution:write", "targets:admin", "content:write", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)
EntitlementStatus = Literal["active", "expired", "revoked", "exhausted"]


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


_SURROGATE = re.compile("[\ud800-\udfff]")


class InputModel(ApiModel):
    """A tool's arguments. Text that PostgreSQL cannot store is refused here, naming the field."""

    @field_validator("*")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        if problem := _unstorable(value):
            raise ValueError(problem)
        return value


def _unstorable(value: Any, where: str = "") -> str | None:
    """Why ``value`` (or the key or item at ``where`` inside it) cannot be stored, if it cannot."""
    if isinstance(value, str):
        if "\x00" in value:
            return f"{where} contains a NUL character (\\u0000), which cannot be stored".strip()
        if _SURROGATE.search(value):
            return f"{where} contains an unpaired UTF-16 surrogate, which is not valid Unicode".strip()
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if problem := _unstorable(key, f"{where} key {key!r}".strip()) or _unstorable(item, f"{where}[{key!r}]"):
                return problem
    if isinstance(value, list):
        for index, item in enumerate(value):
            if problem := _unstorable(item, f"{where}[{index}]"):
                return problem
    return None


# --- agents and entitlements -----------------------------------------------------------------


class Agent(ApiModel):
    """Who calls: every row it makes belongs to its tenant, and its scopes say which tools it may call."""

    id: UUID
    name: str
    tenant_id: str
    scopes: list[Scope]
    key_prefix: str | None = Field(None, description="The first characters of its key, to tell keys apart.")
    created_at: datetime | None = None
    revoked_at: datetime | None = None

    def may(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


class Entitlement(ApiModel):
    """A grant to an agent of the right to distribute one content item, or all of its tenant's."""

    id: UUID
    tenant_id: str
    agent_id: UUID
    content_item_id: UUID | None = Field(description="None: every content item of the tenant.")
    status: EntitlementStatus = Field(
        description="As it stands now: an active grant past expiresAt is expired, one whose budget is spent exhausted."
    )
    expires_at: datetime | None
    allowed_channels: list[str] = Field(description="Channel types it covers; empty means any.")
    allow_redistribution: bool
    excerpt_only: bool = Field(description="Only excerpts may be sent (transformPolicy.excerptOnly).")
    max_excerpt_chars: int | None
    max_distributions: int | None = Field(description="How many deliveries (one per target) it allows in all.")
    distributions_used: int
    created_at: datetime
    revoked_at: datetime | None

    @property
    def remaining(self) -> int | None:
        return None if self.max_distributions is None else self.max_distributions - self.distributions_used


class MyEntitlements(ApiModel):
    agent: Agent
    entitlements: list[Entitlement]


class Decision(ApiModel):
    """An entitlement decision for one target: allowed (as the item's creator, or by a grant) or denied."""

    outcome: Literal["allow", "deny"]
    code: str = Field(description="OWNER or ENTITLED when allowed; the denial's error code when denied.")
    message: str | None = None
    remediation: str | None = None
    entitlement_id: UUID | None = None


# --- content --------------------------------------------------------------------------------


# JSON parsers give up somewhere past 200 levels (pydantic's, the MCP SDK's client's): an item
# nested that deep could be stored but not read back.
MAX_METADATA_DEPTH = 32


def _depth(value: Any) -> int:
    """How many objects and arrays ``value`` nests, counted without recursing."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            level.extend((child, depth + 1) for child in children)
    return deepest


def _shallow(metadata: dict[str, Any]) -> dict[str, Any]:
    if _depth(metadata) > MAX_METADATA_DEPTH:
        raise ValueError(f"nests deeper than {MAX_METADATA_DEPTH} levels of objects and arrays")
    return metadata


class UpsertContentItemInput(InputModel):
    id: UUID | None = Field(None, description="Omit to create a new item; give an existing id to update it.")
    title: Annotated[str, Field(min_length=1, max_length=500)]
    body: str = Field(max_length=1_000_000, description="The body as Markdown, up to 1,000,000 characters.")
    body_format: Literal["markdown", "html"] = Field(
        "markdown", description="html: the body arrives as HTML and is stored as Markdown (markdownify)."
    )
    summary: Annotated[str | None, Field(max_length=5_000)] = None
    canonical_url: HttpUrl | None = None
    metadata: Annotated[dict[str, Any], AfterValidator(_shallow)] = Field(
        default_factory=dict, description=f"Any JSON object, nested at most {MAX_METADATA_DEPTH} levels deep."
    )


class ContentItem(ApiModel):
    id: UUID
    title: str
    body: str = Field(description="Markdown.")
    summary: str | None
    canonical_url: str | None
    metadata: dict[str, Any]
    version: int = Field(description="Starts at 1 and grows by one on every update.")
    created_at: datetime
    updated_at: datetime
    created_by_agent_id: UUID | None = Field(
        None, description="The agent that created it: it may always distribute it; others need an entitlement."
    )


# --- targets --------------------------------------------------------------------------------


UTM_KEYS = ("source", "medium", "campaign", "term", "content")
_HASHTAG = re.compile(r"^\w{1,100}$")


def _utm_keys(utm: dict[str, str] | None) -> dict[str, str] | None:
    if utm is not None and (unknown := sorted(set(utm) - set(UTM_KEYS))):
        raise ValueError(f"unknown UTM parameter(s) {unknown}; use {', '.join(UTM_KEYS)}")
    return utm


def _hashtags(tags: list[str]) -> list[str]:
    tags = [tag.removeprefix("#") for tag in tags]
    if bad := [tag for tag in tags if not _HASHTAG.match(tag)]:
        raise ValueError(f"hashtags are letters, digits and underscores only: {bad}")
    return tags


class TransformPolicy(InputModel):
    """How an item becomes a channel's post. A target may hold one as its default; a plan's
    policy wins over it field by field (only the fields the plan sets)."""

    output_format: Literal["markdown", "html", "plaintext"] = Field(
        "markdown",
        validation_alias=AliasChoices("outputFormat", "output_format", "bodyFormat", "body_format"),
        description="The body as Markdown, as HTML (raw HTML escaped, unsafe links dropped), or as plain "
        "text that keeps link targets. `bodyFormat` is accepted as an older name for it.",
    )
    max_length: Annotated[int | None, Field(ge=1, le=1_000_000)] = Field(
        None,
        description="Cut the text to this length, at the end of a word, with an ellipsis. Defaults to the "
        "channel's limit (none for webhooks); counted as the channel counts.",
    )
    excerpt_only: bool = Field(False, description="Send the summary, or the body's opening, never the full body.")
    include_canonical_url: bool = Field(True, description="Send the item's canonical link (kept after a cut).")
    include_attribution: bool = Field(
        False, description="Add an attribution line from the item's metadata `author` and `license`."
    )
    utm: Annotated[dict[str, Annotated[str, Field(max_length=500)]] | None, AfterValidator(_utm_keys)] = Field(
        None, description='UTM parameters added to the canonical link (up to 500 characters each), e.g. '
        '{"source": "mastodon"}.'
    )
    hashtags: Annotated[list[str], Field(max_length=30), AfterValidator(_hashtags)] = Field(
        default_factory=list, description="Hashtags to add, with or without '#'."
    )
    include_body: bool = Field(True, description="False sends title, summary and link only.")
    include_metadata: bool = True

    def over(self, default: TransformPolicy | None) -> TransformPolicy:
        """This policy on top of a target's ``default``: the fields set here win."""
        if default is None:
            return self
        merged = default.model_dump(exclude_unset=True) | self.model_dump(exclude_unset=True)
        return TransformPolicy.model_validate(merged)


class RegisterTargetInput(InputModel):
    name: Annotated[str, Field(min_length=1, max_length=200, description="Unique among targets.")]
    channel_type: str = Field(description="The adapter, e.g. 'webhook'.")
    config: dict[str, Any] = Field(
        default_factory=dict, description='Non-secret settings. For a webhook: {"url": "https://…"}.'
    )
    secrets: dict[str, str] | None = Field(
        None,
        description="Write-only credentials, stored encrypted and never returned. "
        'For a webhook: {"signingSecret": "whsec_…"} signs deliveries per Standard Webhooks.',
    )
    max_concurrency: Annotated[int | None, Field(ge=1, le=10_000)] = Field(
        None,
        description="The most deliveries to this target in flight at once, across every worker. "
        "Omit for the channel's default (none for webhooks).",
    )
    rate_per_minute: Annotated[float | None, Field(gt=0, le=1_000_000)] = Field(
        None,
        description="The most deliveries to this target per minute, across every worker (a token bucket "
        "holding a minute's worth). Omit for the channel's default (none for webhooks).",
    )
    transform_policy: TransformPolicy | None = Field(
        None, description="This target's default transform policy; a plan's policy wins over it field by field."
    )


class Target(ApiModel):
    id: UUID
    name: str
    channel_type: str
    config: dict[str, Any]
    has_secrets: bool
    secret_fingerprint: str | None = Field(
        None, description="A short fingerprint of the stored secrets: it changes when they change, and reveals nothing."
    )
    active: bool
    suspended_until: datetime | None
    created_at: datetime
    max_concurrency: int | None = None
    rate_per_minute: float | None = None
    transform_policy: TransformPolicy | None = None
    generated_secrets: dict[str, str] | None = Field(
        None,
        description="Secrets generated for this target at registration (a webhook's signingSecret when none "
        "was given). Shown this once and never again: give them to the receiver now.",
    )


class TargetList(ApiModel):
    targets: list[Target]


class RotateTargetSecretInput(InputModel):
    target_id: UUID
    grace_hours: float = Field(
        24.0,
        ge=0,
        le=720,
        description="How long deliveries also carry a signature with the old secret, so the receiver can "
        "switch over; 0 drops it at once.",
    )


class SecretRotation(ApiModel):
    target_id: UUID
    secrets: dict[str, str] = Field(description="The new secrets, shown this once.")
    previous_valid_until: datetime | None = Field(
        None, description="Until when deliveries also carry a signature with the previous secret."
    )


# --- plans ----------------------------------------------------------------------------------


def _distinct(ids: list[UUID]) -> list[UUID]:
    if len(set(ids)) != len(ids):
        raise ValueError("names the same target more than once")
    return ids


def _distinct_or_none(ids: list[UUID] | None) -> list[UUID] | None:
    if ids is not None and len(set(ids)) != len(ids):
        raise ValueError("names the same job more than once")
    return ids


class CreateDistributionPlanInput(InputModel):
    content_item_id: UUID
    target_ids: Annotated[list[UUID], Field(min_length=1, max_length=100), AfterValidator(_distinct)]
    transform_policy: TransformPolicy | None = None
    await_delivery: bool = Field(
        False, description="Wait up to 10 s for every job to finish; returns the current state if not."
    )
    dry_run: bool = Field(
        False, description="Return each target's transformed payload and entitlement decision; queue nothing."
    )
    allow_duplicate: bool = Field(
        False,
        description="Queue it even if a plan for the same item and one of these targets was made in the last 5 "
        "minutes (which otherwise fails with DUPLICATE_DISTRIBUTION_PLAN).",
    )
    idempotency_key: Annotated[str | None, Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")] = Field(
        None,
        description="Makes the call safe to repeat: for 24 hours the same key returns the plan it first made, "
        "queuing nothing new. The same key with other arguments fails with IDEMPOTENCY_KEY_REUSED.",
    )


class PlanRef(InputModel):
    plan_id: UUID


class RetryPlanInput(InputModel):
    plan_id: UUID
    job_ids: Annotated[list[UUID] | None, Field(min_length=1, max_length=100), AfterValidator(_distinct_or_none)] = (
        Field(None, description="The failed jobs to drive again; omit for every failed job of the plan.")
    )


class Job(ApiModel):
    id: UUID
    target_id: UUID
    status: JobStatus
    attempt: int = Field(description="Attempts started so far; a queued job with attempt > 0 awaits a retry.")
    max_attempts: int
    next_attempt_at: datetime
    last_error: str | None
    updated_at: datetime


class Receipt(ApiModel):
    id: UUID
    job_id: UUID
    target_id: UUID
    attempt: int
    succeeded: bool
    external_url: str | None
    status_code: int | None
    error_message: str | None
    raw_meta: dict[str, Any]
    created_at: datetime


class Preview(ApiModel):
    target_id: UUID
    channel_type: str
    payload: dict[str, Any] = Field(
        description="Exactly what would be sent; empty for a target the entitlement check denied."
    )
    length: int | None = Field(None, description="The text's length, counted as the channel counts.")
    limit: int | None = Field(None, description="The most the channel (or the policy's maxLength) allows.")
    truncated: bool = Field(False, description="Whether the text was cut to fit.")
    cut_at: int | None = Field(None, description="Where in the text it was cut, in characters.")
    decision: Decision | None = Field(None, description="Whether the calling agent may distribute to this target.")


class Plan(ApiModel):
    id: UUID | None = Field(description="None for a dry run, which creates nothing.")
    content_item_id: UUID
    content_version: int
    status: PlanStatus | Literal["dry_run"]
    created_at: datetime | None = None
    completed_at: datetime | None = None
    cancel_requested_at: datetime | None = Field(
        None, description="When cancel_plan was called. Attempts in flight then finish, but none is retried."
    )
    jobs: list[Job] = Field(default_factory=list)
    receipts: list[Receipt] | None = Field(None, description="Present when awaitDelivery was set.")
    previews: list[Preview] | None = Field(None, description="Present for a dry run.")
    await_timed_out: bool | None = Field(
        None, description="True when awaitDelivery gave up waiting; call get_plan later."
    )


class ReceiptList(ApiModel):
    plan_id: UUID
    receipts: list[Receipt]
