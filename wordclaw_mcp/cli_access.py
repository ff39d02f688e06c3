"""``wordclaw agents …`` and ``wordclaw entitlements …``: the operator's side of access control."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import anyio

from .access import DEFAULT_TENANT, AccessService
from .adapters import adapter_classes
from .config import Settings
from .database import open_pool
from .models import SCOPES, Agent, Entitlement

T = TypeVar("T")


def add_parsers(commands: Any) -> None:
    agents = commands.add_parser("agents", help="API keys: create, list and revoke agents").add_subparsers(
        dest="agents_command", required=True
    )
    create = agents.add_parser("create", help="create an agent and print its API key, once")
    create.add_argument("name")
    create.add_argument(
        "--scopes",
        required=True,
        type=_scopes,
        help=f"comma-separated, from: {', '.join(SCOPES)} (admin implies every other)",
    )
    create.add_argument("--tenant", default=DEFAULT_TENANT, help=f"the agent's tenant (default {DEFAULT_TENANT})")
    agents.add_parser("list", help="every agent, with its tenant, scopes and key prefix")
    revoke = agents.add_parser("revoke", help="revoke an agent's key (running servers stop taking it within 5 s)")
    revoke.add_argument("agent_id", type=UUID)

    grants = commands.add_parser(
        "entitlements", help="grant, list and revoke agents' rights over content items"
    ).add_subparsers(dest="entitlements_command", required=True)
    grant = grants.add_parser("grant", help="grant an agent the right to distribute an item (or all of its tenant's)")
    grant.add_argument("--agent", type=UUID, required=True, help="the agent's id (wordclaw agents list)")
    which = grant.add_mutually_exclusive_group(required=True)
    which.add_argument("--item", type=UUID, help="one content item")
    which.add_argument("--all-items", action="store_true", help="every content item of the agent's tenant")
    grant.add_argument("--channels", type=_list, default=[], help="comma-separated channel types (default: any)")
    grant.add_argument("--allow-redistribution", action="store_true", help="allow sending it to channels at all")
    grant.add_argument("--excerpt-only", action="store_true", help="only excerpts (transformPolicy.excerptOnly)")
    grant.add_argument("--max-excerpt-chars", type=int, help="the longest excerpt, in characters")
    grant.add_argument("--max-distributions", type=int, help="the budget: deliveries (one per target) in all")
    expiry = grant.add_mutually_exclusive_group()
    expiry.add_argument("--expires-at", type=_instant, help="ISO 8601, e.g. 2027-01-01T00:00:00Z")
    expiry.add_argument("--expires-in-days", type=float, help="days from now")
    listing = grants.add_parser("list", help="grants, newest first, with their status and budget")
    listing.add_argument("--agent", type=UUID, help="only this agent's")
    revoke_grant = grants.add_parser("revoke", help="revoke a grant; its queued jobs fail instead of being sent")
    revoke_grant.add_argument("entitlement_id", type=UUID)


def run(args: argparse.Namespace, settings: Settings) -> list[str]:
    """The lines to print for an ``agents`` or ``entitlements`` command."""
    if args.command == "agents":
        return anyio.run(_with_access, settings, lambda access: _agents(args, access))
    return anyio.run(_with_access, settings, lambda access: _entitlements(args, access))


async def _with_access(settings: Settings, action: Callable[[AccessService], Awaitable[T]]) -> T:
    async with _access(settings) as access:
        return await action(access)


@asynccontextmanager
async def _access(settings: Settings) -> AsyncIterator[AccessService]:
    pool, _url = await open_pool(settings, max_size=2)
    try:
        yield AccessService(pool)
    finally:
        await pool.close()


async def _agents(args: argparse.Namespace, access: AccessService) -> list[str]:
    if args.agents_command == "create":
        agent, key = await access.create_agent(args.name, args.scopes, args.tenant)
        return [
            _agent_line(agent),
            f"key: {key}",
            "This key is shown once and cannot be recovered: give it to the agent now "
            "(WORDCLAW_AGENT_KEY for stdio, Authorization: Bearer over HTTP).",
        ]
    if args.agents_command == "revoke":
        return [_agent_line(await access.revoke_agent(args.agent_id))]
    agents = await access.list_agents()
    return ["id\tname\ttenant\tscopes\tkey\tcreated\trevoked"] + [_agent_line(agent) for agent in agents]


async def _entitlements(args: argparse.Namespace, access: AccessService) -> list[str]:
    if args.entitlements_command == "grant":
        expires_at = args.expires_at
        if args.expires_in_days is not None:
            expires_at = datetime.now(UTC) + timedelta(days=args.expires_in_days)
        granted = await access.grant(
            args.agent,
            content_item_id=args.item,
            expires_at=expires_at,
            allowed_channels=args.channels,
            allow_redistribution=args.allow_redistribution,
            excerpt_only=args.excerpt_only,
            max_excerpt_chars=args.max_excerpt_chars,
            max_distributions=args.max_distributions,
            channel_types=adapter_classes().keys(),
        )
        return [_grant_line(granted)]
    if args.entitlements_command == "revoke":
        return [_grant_line(await access.revoke_entitlement(args.entitlement_id))]
    grants = await access.list_entitlements(args.agent)
    header = "id\tagent\titem\tstatus\tchannels\tredistribution\texcerpt\tused/budget\texpires"
    return [header] + [_grant_line(grant) for grant in grants]


def _agent_line(agent: Agent) -> str:
    when = [at.isoformat(timespec="seconds") if at else "-" for at in (agent.created_at, agent.revoked_at)]
    key = f"wck_{agent.key_prefix}…" if agent.key_prefix else "(no key)"
    return "\t".join([str(agent.id), agent.name, agent.tenant_id, ",".join(agent.scopes), key, *when])


def _grant_line(grant: Entitlement) -> str:
    excerpt = "-"
    if grant.excerpt_only:
        excerpt = f"only (≤{grant.max_excerpt_chars})" if grant.max_excerpt_chars else "only"
    fields = [
        str(grant.id),
        str(grant.agent_id),
        str(grant.content_item_id or "all"),
        grant.status,
        ",".join(grant.allowed_channels) or "any",
        "yes" if grant.allow_redistribution else "no",
        excerpt,
        f"{grant.distributions_used}/{grant.max_distributions or '∞'}",
        grant.expires_at.isoformat(timespec="seconds") if grant.expires_at else "never",
    ]
    return "\t".join(fields)


def _scopes(value: str) -> list[str]:
    scopes = _list(value)
    if unknown := sorted(set(scopes) - set(SCOPES)):
        raise argparse.ArgumentTypeError(f"unknown scope(s) {', '.join(unknown)}; choose from {', '.join(SCOPES)}")
    if not scopes:
        raise argparse.ArgumentTypeError("give at least one scope")
    return scopes


def _list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _instant(value: str) -> datetime:
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO 8601 time, e.g. 2027-01-01T00:00:00Z") from None
    if instant.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} has no time zone; add Z or an offset such as +01:00")
    return instant
