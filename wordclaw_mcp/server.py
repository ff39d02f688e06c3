"""The MCP server: tools generated from the pydantic models, errors mapped to stable codes."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from . import __version__, access, errors
from .bearer import AGENT_STATE
from .config import Settings
from .database import CONNECTION_ERRORS
from .errors import DatabaseUnavailable, DistributionError
from .keys import verify_stored_secrets
from .models import (
    Agent,
    ContentItem,
    CreateDistributionPlanInput,
    MyEntitlements,
    Plan,
    PlanRef,
    ReceiptList,
    RegisterTargetInput,
    RetryPlanInput,
    RotateTargetSecretInput,
    Scope,
    SecretRotation,
    Target,
    TargetList,
    UpsertContentItemInput,
)
from .runtime import Runtime, worker_component
from .service import DistributionService

log = logging.getLogger(__name__)

INSTRUCTIONS = """\
WordClaw Distribution publishes a content item once and fans it out to many channels.
1. upsert_content_item creates (or, given an id, updates) the item.
2. register_target once per destination; list_targets shows what exists.
3. create_distribution_plan queues one job per target. Set awaitDelivery to wait up to 10 s
   for the outcome, or dryRun to preview each target's payload without sending anything.
4. get_plan, get_receipts and cancel_plan follow up; retry_plan drives failed jobs again.
You act as one agent of one tenant (get_my_entitlements says which, with your scopes and grants):
you see only your tenant's items, targets and plans, and may distribute the items you created;
other items need an entitlement. A plan for the same item and target within 5 minutes fails with
DUPLICATE_DISTRIBUTION_PLAN unless allowDuplicate is set; give an idempotencyKey to retry safely.
A failed call is a tool error (isError) whose text is {"error": {"code", "message", "remediation"}};
the code is stable.
"""


class WordClawServer(MCPServer[DistributionService]):
    """Every failure a caller can cause comes back as a coded tool error, never a traceback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_arguments: dict[str, frozenset[str]] = {}
        self.runtime: Runtime | None = None  # set while the lifespan is open

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[DistributionService, Any] | None = None
    ) -> Any:
        try:
            self._check_arguments(name, arguments)
            return await super().call_tool(name, arguments, context)
        except DistributionError as exc:
            return error_result(exc)
        except ToolError as exc:
            error = _classify(name, exc)
            if isinstance(error, DatabaseUnavailable) and self.runtime is not None:
                # A restart kills every pooled connection at once; replace them all now rather
                # than fail one more call per dead connection.
                await self.runtime.pool.expire_connections()
            return error_result(error)

    def _check_arguments(self, name: str, arguments: dict[str, Any]) -> None:
        allowed = self.tool_arguments.get(name)
        if allowed is None:
            raise DistributionError(
                "UNKNOWN_TOOL", f"There is no tool named {name!r}.", "Call tools/list for the tools this server offers."
            )
        # The SDK ignores unexpected arguments; an agent that misspells one deserves to hear so.
        unknown = sorted(set(arguments) - allowed)
        if unknown:
            raise errors.validation_error(
                f"Unknown argument(s) for {name}: {', '.join(unknown)}.", allowedArguments=sorted(allowed)
            )


def error_result(error: DistributionError) -> CallToolResult:
    """The error as JSON text, and no ``structuredContent``.

    Structured content must match the tool's output schema, which describes a success: the
    TypeScript SDK (the MCP Inspector, many IDE clients) validates it even when ``isError`` is
    set, so an error object there would reach the user as a schema mismatch instead of its code.
    """
    body = {"error": error.to_dict()}
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(body))], is_error=True)


def _classify(name: str, exc: ToolError) -> DistributionError:
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, (DistributionError, ValidationError, *CONNECTION_ERRORS)):
        cause = cause.__cause__
    if isinstance(cause, DistributionError):
        return cause
    if isinstance(cause, ValidationError):
        return errors.validation_error(f"Invalid arguments for {name}: {errors.describe_validation(cause.errors())}.")
    if isinstance(cause, CONNECTION_ERRORS):
        log.warning("tool %s lost the database: %s", name, type(cause).__name__)
        return DatabaseUnavailable(f"the connection failed during {name} ({type(cause).__name__})")
    log.error("tool %s failed unexpectedly", name, exc_info=exc)
    return DistributionError(
        "INTERNAL_ERROR",
        f"The {name} tool failed unexpectedly.",
        "Retry once; if it fails again, report it with the server's log.",
    )


# --- tools ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSpec:
    """A tool is a service method of the same name, with its input and output models."""

    name: str
    input_model: type[BaseModel] | None
    output_model: type[BaseModel]
    scope: Scope
    description: str
    read_only: bool = False


TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "upsert_content_item",
        UpsertContentItemInput,
        ContentItem,
        "content:write",
        "Create a content item (omit id) or update one (give its id). Returns the item with its id and version.",
    ),
    ToolSpec(
        "register_target",
        RegisterTargetInput,
        Target,
        "targets:admin",
        "Register a destination. Secrets are stored encrypted and never returned. "
        'A webhook takes config {"url": ...} and optional secrets {"signingSecret": "whsec_..."}; without one, '
        "a signing secret is generated and returned once in generatedSecrets.",
    ),
    ToolSpec(
        "list_targets",
        None,
        TargetList,
        "distribution:read",
        "List your tenant's targets, without secrets (secretFingerprint tells secrets apart).",
        read_only=True,
    ),
    ToolSpec(
        "rotate_target_secret",
        RotateTargetSecretInput,
        SecretRotation,
        "targets:admin",
        "Give a target a new secret (a webhook's signingSecret), shown once. For graceHours (default 24) "
        "deliveries carry signatures with both the new and the old secret, so the receiver can switch over.",
    ),
    ToolSpec(
        "create_distribution_plan",
        CreateDistributionPlanInput,
        Plan,
        "distribution:write",
        "Queue one delivery job per target for a content item, once every target passes the entitlement check "
        "(any denial queues nothing). awaitDelivery waits up to 10 s and returns receipts; dryRun returns each "
        "target's payload and entitlement decision and queues nothing. The same item and target again within 5 "
        "minutes fails with DUPLICATE_DISTRIBUTION_PLAN unless allowDuplicate; an idempotencyKey makes the call "
        "safe to repeat for 24 hours.",
    ),
    ToolSpec("get_plan", PlanRef, Plan, "distribution:read", "A plan's status and its jobs.", read_only=True),
    ToolSpec(
        "cancel_plan",
        PlanRef,
        Plan,
        "distribution:write",
        "Cancel a plan: queued jobs end cancelled at once, and a delivery in flight is stopped and ends "
        "cancelled, never retried, with a receipt that says whether the request had been sent. A job that "
        "delivered before the cancel stays succeeded. Cancelling twice is harmless.",
    ),
    ToolSpec(
        "get_receipts", PlanRef, ReceiptList, "distribution:read", "Every attempt's receipt for a plan.", read_only=True
    ),
    ToolSpec(
        "retry_plan",
        RetryPlanInput,
        Plan,
        "distribution:write",
        "Drive a plan's failed jobs again (all of them, or jobIds), each with a fresh attempt budget. "
        "Earlier receipts are kept. A job that ended DELIVERY_OUTCOME_UNKNOWN (it may have posted) is only "
        "driven again when named in jobIds: check the account first. Returns the plan.",
    ),
    ToolSpec(
        "get_my_entitlements",
        None,
        MyEntitlements,
        "distribution:read",
        "Who you are (agent, tenant, scopes) and the entitlements you hold over other agents' content items, "
        "each with its status, channels, excerpt rules and remaining budget.",
        read_only=True,
    ),
)


async def caller(ctx: Context, service: DistributionService) -> Agent:
    """The agent this call is made by.

    Over HTTP, the one whose bearer key BearerAuth checked for this request; over stdio (and
    in-process), the one WORDCLAW_AGENT_KEY names, or the local agent where that is allowed.
    """
    request = ctx.request_context.request
    if request is not None:
        agent = getattr(request.state, AGENT_STATE, None)
        if agent is None:
            raise access.invalid_key()
        return agent
    if service.settings.agent_key:
        return await service.access.authenticate(service.settings.agent_key)
    if service.settings.local_agent_allowed:
        return access.LOCAL_AGENT
    raise access.key_required()


def add_model_tool(server: WordClawServer, spec: ToolSpec) -> None:
    """Register ``spec`` so that its arguments are exactly its input model's fields.

    The SDK derives a tool's input schema from a function signature, so the signature is made
    from the model: one camelCase keyword per field, with its type, constraints and description.
    """
    parameters = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context)]
    for field_name, field in (spec.input_model.model_fields if spec.input_model else {}).items():
        annotation = Annotated[(field.annotation, *field.metadata, Field(description=field.description))]
        default = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
        parameters.append(
            inspect.Parameter(
                field.alias or field_name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )
        )

    async def tool(ctx: Context, **arguments: Any) -> BaseModel:
        service: DistributionService = ctx.request_context.lifespan_context
        agent = await caller(ctx, service)
        if not agent.may(spec.scope):
            raise access.forbidden(agent, spec.scope, spec.name)
        method = getattr(service, spec.name)
        if spec.input_model is None:
            return await method(agent=agent)
        return await method(spec.input_model.model_validate(arguments), agent=agent)

    tool.__signature__ = inspect.Signature(parameters, return_annotation=spec.output_model)  # type: ignore[attr-defined]
    tool.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": spec.output_model}
    server.tool_arguments[spec.name] = frozenset(p.name for p in parameters[1:])
    server.add_tool(
        tool,
        name=spec.name,
        description=spec.description,
        annotations=ToolAnnotations(readOnlyHint=spec.read_only, openWorldHint=not spec.read_only),
    )


def build_server(settings: Settings | None = None, *, checked: bool = False) -> WordClawServer:
    """The MCP server. Its lifespan opens the service and, when configured, an in-process worker.

    ``checked``: the caller has verified the stored secrets and the agent key already
    (``wordclaw-mcp`` does, to fail with one line before serving), so the lifespan, which may
    open once per HTTP session, does not decrypt every secret again.
    """
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(server: WordClawServer) -> AsyncIterator[DistributionService]:
        async with Runtime.open(settings) as runtime:
            server.runtime = runtime
            service = DistributionService(runtime)
            if not checked:
                # Stored secrets these keys cannot read fail the start, not a delivery later;
                # so does a wrong or revoked key, rather than every call.
                await verify_stored_secrets(runtime.pool, runtime.secrets)
                if settings.agent_key:
                    await service.access.authenticate(settings.agent_key)
            if not settings.worker_in_server:
                yield service
                return
            try:
                worker = worker_component("daemon")(runtime)
            except DistributionError as exc:
                # The tools still work; delivery waits for a worker process.
                log.error("not delivering from this process: %s: %s %s", exc.code, exc.message, exc.remediation)
                yield service
                return
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                try:
                    yield service
                finally:
                    worker.stop()

    server = WordClawServer(
        "wordclaw-distribution", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan
    )
    for spec in TOOLS:
        add_model_tool(server, spec)

    @server.resource(
        "feed://{target_id}",
        name="feed",
        mime_type="application/xml",
        description="The current RSS or Atom feed of a feed target, as its file holds it.",
    )
    async def feed(target_id: str, ctx: Context) -> str:
        service: DistributionService = ctx.request_context.lifespan_context
        try:
            try:
                target = UUID(target_id)
            except ValueError:
                raise errors.target_not_found(target_id) from None
            agent = await caller(ctx, service)
            if not agent.may("distribution:read"):
                raise access.forbidden(agent, "distribution:read", "feed://")
            return await service.read_feed(target, agent=agent)
        except DistributionError as exc:
            # The same code, message and remediation a tool answers with.
            raise ResourceError(json.dumps({"error": exc.to_dict()})) from None
        except Exception:
            log.exception("reading feed://%s failed unexpectedly", target_id)
            error = DistributionError(
                "INTERNAL_ERROR",
                f"The feed of target {target_id} could not be read.",
                "Retry once; if it fails again, report it with the server's log.",
            )
            raise ResourceError(json.dumps({"error": error.to_dict()})) from None

    return server
