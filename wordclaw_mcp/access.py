"""Who may publish what: agents and their API keys, scopes, and entitlements.

An agent belongs to one tenant and sees only that tenant's rows. It may distribute the content
items it created; any other item of its tenant needs an entitlement (a grant), which may limit
the channels, require excerpts, expire, or carry a budget of distributions. ``decide`` is the
rule; the service applies it at plan creation and the worker again at delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from . import errors, queries, text
from .database import transaction
from .errors import DistributionError
from .models import SCOPES, Agent, ContentItem, Decision, Entitlement, TransformPolicy

KEY_PREFIX = "wck_"
# Characters after "wck_" kept in clear to find a key's row; the rest is only ever hashed.
LOOKUP_CHARS = 8
# A revoked key keeps working in a running server for at most this long.
AUTH_CACHE_SECONDS = 5.0

DEFAULT_TENANT = "default"
LOCAL_AGENT = Agent(
    id=UUID("00000000-0000-0000-0000-000000000001"), name="local-agent", tenant_id=DEFAULT_TENANT, scopes=["admin"]
)


def new_key() -> str:
    """A new API key: wck_ and 43 random URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> bytes:
    # Keys are 256 random bits: a plain hash is as hard to reverse as the key is to guess.
    return hashlib.sha256(key.encode()).digest()


def invalid_key() -> DistributionError:
    return DistributionError(
        "AGENT_KEY_INVALID",
        "The API key is not one this deployment issued, or it was revoked.",
        "Use the key `wordclaw agents create` printed (WORDCLAW_AGENT_KEY for stdio, "
        "`Authorization: Bearer wck_…` over HTTP), or ask the operator for a new one.",
    )


def key_required() -> DistributionError:
    return DistributionError(
        "AGENT_KEY_REQUIRED",
        "No API key was given, and this deployment has no local agent (its database is not the embedded one).",
        "Set WORDCLAW_AGENT_KEY to a key from `wordclaw agents create`, or WORDCLAW_LOCAL_AGENT=true on a "
        "single-user installation.",
    )


def forbidden(agent: Agent, scope: str, tool: str) -> DistributionError:
    return DistributionError(
        "FORBIDDEN",
        f"Agent {agent.name!r} may not call {tool}: it needs the scope {scope!r}.",
        f"Ask the operator for a key with the {scope} scope (wordclaw agents create NAME --scopes {scope}).",
        requiredScope=scope,
        agentScopes=list(agent.scopes),
    )


# --- the rule -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """``decide``'s answer for one target; ``grant`` is what an allowance by entitlement spends."""

    decision: Decision
    grant: Entitlement | None = None
    error: DistributionError | None = None

    @property
    def allowed(self) -> bool:
        return self.decision.outcome == "allow"


def _deny(error: DistributionError, grant: Entitlement | None = None) -> Verdict:
    decision = Decision(
        outcome="deny",
        code=error.code,
        message=error.message,
        remediation=error.remediation,
        entitlement_id=grant.id if grant else None,
    )
    return Verdict(decision, grant, error)


def decide(
    agent: Agent, item: ContentItem, channel_type: str, policy: TransformPolicy, grants: list[Entitlement]
) -> Verdict:
    """May ``agent`` send ``item`` to a ``channel_type`` target under ``policy``?

    ``grants`` are the agent's entitlements over the item, the item's own first. The first active
    grant that allows the send is used; otherwise the denial names what the nearest grant lacks.
    """
    if item.created_by_agent_id == agent.id:
        return Verdict(Decision(outcome="allow", code="OWNER"))
    if not grants:
        return _deny(
            DistributionError(
                "ENTITLEMENT_NOT_FOUND",
                f"Agent {agent.name!r} holds no entitlement to distribute content item {item.id}, "
                "which another agent created.",
                "Ask the operator for a grant (wordclaw entitlements grant --agent AGENT_ID --item ITEM_ID "
                "--allow-redistribution); get_my_entitlements lists what you hold.",
                contentItemId=str(item.id),
            )
        )
    active = [grant for grant in grants if grant.status == "active"]
    if not active:
        return _deny(_inactive(grants[0], item), grants[0])
    lacks = [(_lacks(grant, item, channel_type, policy), grant) for grant in active]
    if usable := next((grant for denial, grant in lacks if denial is None), None):
        return Verdict(Decision(outcome="allow", code="ENTITLED", entitlement_id=usable.id), usable)
    denial, grant = lacks[0]
    assert denial is not None
    return _deny(denial, grant)


def _inactive(grant: Entitlement, item: ContentItem) -> DistributionError:
    where = f"entitlement {grant.id} over content item {item.id}"
    if grant.status == "revoked":
        return DistributionError(
            "ENTITLEMENT_REVOKED",
            f"The {where} was revoked.",
            "Ask the operator for a new grant; a revoked one cannot be restored.",
            entitlementId=str(grant.id),
        )
    if grant.status == "expired":
        return DistributionError(
            "ENTITLEMENT_EXPIRED",
            f"The {where} expired at {grant.expires_at.isoformat() if grant.expires_at else 'its end'}.",
            "Ask the operator to grant it again with a later expiry.",
            entitlementId=str(grant.id),
        )
    return DistributionError(
        "ENTITLEMENT_EXHAUSTED",
        f"The {where} has used all {grant.max_distributions} of its distributions.",
        "Ask the operator for a grant with a larger budget (--max-distributions).",
        entitlementId=str(grant.id),
        maxDistributions=grant.max_distributions,
    )


def _lacks(
    grant: Entitlement, item: ContentItem, channel_type: str, policy: TransformPolicy
) -> DistributionError | None:
    if not grant.allow_redistribution:
        return DistributionError(
            "REDISTRIBUTION_NOT_ALLOWED",
            f"Entitlement {grant.id} lets the agent use content item {item.id}, not redistribute it.",
            "Ask the operator for a grant with --allow-redistribution.",
            entitlementId=str(grant.id),
        )
    if grant.allowed_channels and channel_type not in grant.allowed_channels:
        return DistributionError(
            "CHANNEL_NOT_ALLOWED",
            f"Entitlement {grant.id} does not cover the {channel_type} channel; it allows "
            f"{', '.join(grant.allowed_channels)}.",
            f"Leave the {channel_type} targets out of targetIds, or ask the operator for a grant that covers "
            f"{channel_type}.",
            entitlementId=str(grant.id),
            channel=channel_type,
            allowedChannels=list(grant.allowed_channels),
        )
    if grant.excerpt_only and not policy.excerpt_only:
        return DistributionError(
            "EXCERPT_ONLY",
            f"Entitlement {grant.id} covers excerpts of content item {item.id} only, and this plan would send "
            "its full body.",
            'Set transformPolicy.excerptOnly to true (e.g. "transformPolicy": {"excerptOnly": true}).',
            entitlementId=str(grant.id),
            maxExcerptChars=grant.max_excerpt_chars,
        )
    return None


def entitled_policy(policy: TransformPolicy, grant: Entitlement | None) -> TransformPolicy:
    """``policy`` within what ``grant`` allows: an excerpt no longer than its maxExcerptChars."""
    if grant is None or not grant.excerpt_only or grant.max_excerpt_chars is None:
        return policy
    if policy.max_length is not None and policy.max_length <= grant.max_excerpt_chars:
        return policy
    return policy.model_copy(update={"max_length": grant.max_excerpt_chars})


def entitled_content(content: ContentItem, grant: Entitlement | None) -> ContentItem:
    """``content`` as ``grant`` lets it be seen, whatever the channel and the policy make of it.

    Under an excerpt-only grant the body is the excerpt (``excerpt_cut``), and the summary and
    every string in the metadata, keys included, are cut to the same bound. The title and the
    canonical link are kept whole. Every channel's payload is made from this item, so none can
    carry more of the text than the grant allows.
    """
    excerpt = excerpt_cut(content, grant)
    if excerpt is None:
        return content
    return content.model_copy(
        update={
            "body": excerpt.text,
            "summary": None if content.summary is None else _cut_to(content.summary, excerpt.limit),
            "metadata": _attribution_within(_metadata_within(content.metadata, excerpt.limit), excerpt.limit),
        }
    )


def _attribution_within(metadata: dict[str, Any], bound: int) -> dict[str, Any]:
    """``metadata`` whose attribution line ("By <author> · <license>") is within ``bound`` too: the
    line joins two values each already cut to it. The license goes first, then the author is cut."""
    line = text.attribution_line(metadata)
    if line is None or len(line) <= bound:
        return metadata
    kept = {key: value for key, value in metadata.items() if key != "license"}
    author = kept.get("author")
    if author and len(f"By {author}") > bound:
        room = bound - len("By ")
        if isinstance(author, str) and room > 0:
            kept["author"] = _cut_to(author, room)
        else:
            del kept["author"]
    return kept


def excerpt_cut(content: ContentItem, grant: Entitlement | None) -> text.Cut | None:
    """The excerpt an excerpt-only grant lets be seen (the summary, else the body's first
    paragraph), cut to its maxExcerptChars, or whole when it sets none: its ``limit`` is the
    bound of everything else. None under any other grant."""
    if grant is None or not grant.excerpt_only:
        return None
    excerpt = content.summary or text.first_paragraph(content.body)
    bound = len(excerpt) if grant.max_excerpt_chars is None else grant.max_excerpt_chars
    return text.cut(excerpt, text.Limit("characters", bound))


def _cut_to(value: str, bound: int) -> str:
    """``value`` in at most ``bound`` characters (code points, URLs as written), cut at the end of
    a word and never inside a URL, with an ellipsis within the bound."""
    if len(value) <= bound:
        return value
    return text.cut(value, text.Limit("characters", bound)).text if bound else ""


def _metadata_within(metadata: dict[str, Any], bound: int) -> dict[str, Any]:
    """Every string of ``metadata``, however deeply nested, within ``bound``. A key longer than the
    bound is item text too: it is left out with its value rather than cut into a key that means
    nothing. Iterative, so that no depth of nesting can exhaust the stack."""
    within: dict[str, Any] = {}
    stack: list[tuple[Any, dict[str, Any] | list[Any]]] = [(metadata, within)]
    while stack:
        source, copy = stack.pop()
        pairs = source.items() if isinstance(source, dict) else enumerate(source)
        for key, value in pairs:
            if isinstance(key, str) and len(key) > bound:
                continue
            if isinstance(value, str):
                value = _cut_to(value, bound)
            elif isinstance(value, dict | list):
                stack.append((value, nested := {} if isinstance(value, dict) else []))
                value = nested
            if isinstance(copy, dict):
                copy[key] = value
            else:
                copy.append(value)
    return within


def spend_failure(grant: Entitlement, item: ContentItem) -> DistributionError:
    """Why a grant that looked usable could not be spent: it changed, or the plan wants more than is left."""
    if grant.status != "active":
        return _inactive(grant, item)
    return DistributionError(
        "ENTITLEMENT_EXHAUSTED",
        f"Entitlement {grant.id} has {grant.remaining} distribution(s) left, fewer than this plan's targets "
        "that rely on it.",
        "Name fewer targets, or ask the operator for a grant with a larger budget (--max-distributions).",
        entitlementId=str(grant.id),
        remaining=grant.remaining,
    )


# --- agents and grants ----------------------------------------------------------------------------


class AccessService:
    """Agents, keys and grants: what operators manage (``wordclaw agents|entitlements``) and what
    every call is authenticated against."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._authenticated: dict[bytes, tuple[float, Agent]] = {}

    async def create_agent(self, name: str, scopes: list[str], tenant: str = DEFAULT_TENANT) -> tuple[Agent, str]:
        """A new agent and its key, which is returned this once and never stored."""
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise errors.validation_error(
                f"Unknown or missing scopes: {', '.join(unknown) or 'none given'}; choose from {', '.join(SCOPES)}."
            )
        if not name.strip():
            raise errors.validation_error("An agent needs a name.")
        key = new_key()
        async with self.pool.acquire() as conn, transaction(conn):
            try:
                await conn.execute(queries.ENSURE_TENANT, tenant)
            except asyncpg.CheckViolationError:
                raise errors.validation_error(
                    f"Tenant {tenant!r} is not a valid tenant id: use lowercase letters, digits, '-' and '_' "
                    "(up to 63 characters, starting with a letter or digit)."
                ) from None
            row = await conn.fetchrow(
                queries.INSERT_AGENT,
                name,
                tenant,
                sorted(set(scopes)),
                key[len(KEY_PREFIX) :][:LOOKUP_CHARS],
                key_digest(key),
            )
        return Agent.model_validate(dict(row)), key

    async def list_agents(self) -> list[Agent]:
        return [Agent.model_validate(dict(row)) for row in await self.pool.fetch(queries.LIST_AGENTS)]

    async def revoke_agent(self, agent_id: UUID) -> Agent:
        row = await self.pool.fetchrow(queries.REVOKE_AGENT, agent_id)
        if row is None:
            raise agent_not_found(agent_id)
        self._authenticated.clear()
        return Agent.model_validate(dict(row))

    async def authenticate(self, key: str) -> Agent:
        """The agent ``key`` belongs to; AGENT_KEY_INVALID for any other key, or a revoked one."""
        digest = key_digest(key)
        now = time.monotonic()
        cached = self._authenticated.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        if not key.startswith(KEY_PREFIX):
            raise invalid_key()
        row = await self.pool.fetchrow(queries.AGENT_BY_KEY_PREFIX, key[len(KEY_PREFIX) :][:LOOKUP_CHARS])
        if row is None or not hmac.compare_digest(bytes(row["key_hash"]), digest) or row["revoked_at"] is not None:
            raise invalid_key()
        agent = Agent.model_validate({k: v for k, v in dict(row).items() if k != "key_hash"})
        if len(self._authenticated) > 1000:
            self._authenticated.clear()
        self._authenticated[digest] = (now + AUTH_CACHE_SECONDS, agent)
        return agent

    async def grant(
        self,
        agent_id: UUID,
        *,
        content_item_id: UUID | None,
        expires_at: datetime | None = None,
        allowed_channels: list[str] | None = None,
        allow_redistribution: bool = False,
        excerpt_only: bool = False,
        max_excerpt_chars: int | None = None,
        max_distributions: int | None = None,
        channel_types: Collection[str] | None = None,
    ) -> Entitlement:
        """Grant ``agent_id`` rights over an item (or all of its tenant's). ``channel_types``, when
        given, are the channels that exist: a grant naming another would cover nothing, so it is
        refused rather than stored."""
        if any(limit is not None and limit < 1 for limit in (max_excerpt_chars, max_distributions)):
            raise errors.validation_error("--max-excerpt-chars and --max-distributions must be at least 1.")
        if channel_types is not None:
            for channel in allowed_channels or []:
                if channel not in channel_types:
                    raise errors.unsupported_channel_type(channel, sorted(channel_types))
        if await self.pool.fetchrow(queries.GET_AGENT, agent_id) is None:
            raise agent_not_found(agent_id)
        row = await self.pool.fetchrow(
            queries.INSERT_ENTITLEMENT,
            agent_id,
            content_item_id,
            expires_at,
            sorted(set(allowed_channels or [])),
            allow_redistribution,
            excerpt_only,
            max_excerpt_chars,
            max_distributions,
        )
        if row is None:
            raise errors.content_item_not_found(content_item_id)
        return Entitlement.model_validate(dict(row))

    async def list_entitlements(self, agent_id: UUID | None = None) -> list[Entitlement]:
        return [
            Entitlement.model_validate(dict(row)) for row in await self.pool.fetch(queries.LIST_ENTITLEMENTS, agent_id)
        ]

    async def revoke_entitlement(self, entitlement_id: UUID) -> Entitlement:
        row = await self.pool.fetchrow(queries.REVOKE_ENTITLEMENT, entitlement_id)
        if row is None:
            raise DistributionError(
                "ENTITLEMENT_NOT_FOUND",
                f"No entitlement with id {entitlement_id} exists.",
                "Run `wordclaw entitlements list` for the ids that exist.",
            )
        return Entitlement.model_validate(dict(row))

    async def grants_for(self, agent: Agent, content_item_id: UUID) -> list[Entitlement]:
        rows = await self.pool.fetch(queries.ENTITLEMENTS_FOR_ITEM, agent.id, content_item_id)
        return [Entitlement.model_validate(dict(row)) for row in rows]


def agent_not_found(agent_id: object) -> DistributionError:
    return errors.not_found("agent", "AGENT_NOT_FOUND", agent_id, "Run `wordclaw agents list` for the ids that exist.")
