"""Channel adapters: the interface every channel implements, and the registry that finds them.

An adapter turns a content item into its channel's payload, then delivers it. Implementations
live outside the core (the built-ins in ``queue_worker/adapters/``, others in their own
packages) and are found through the ``wordclaw.adapters`` entry-point group, the built-ins
included, so the core never imports them.
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import UUID

from pydantic import BaseModel

from . import errors, text
from .errors import DistributionError
from .http import DEFAULT_LIMIT, DEFAULT_LIMIT_PER_HOST, Answer, ConnectError, HttpClient, TargetRefused
from .models import ContentItem, TransformPolicy
from .store import ChannelStore

ENTRY_POINT_GROUP = "wordclaw.adapters"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryTarget:
    """What an adapter knows about where it delivers. ``secrets`` are decrypted for this call only."""

    id: UUID
    name: str
    config: Mapping[str, Any]
    # Kept out of repr, which is what logs, tracebacks and debuggers print.
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The server that registered the target allowed loopback, private and reserved addresses
    # (WORDCLAW_ALLOW_PRIVATE_TARGETS): it is delivered under that policy, whatever the worker's.
    private_addresses_allowed: bool = False


@dataclass(frozen=True)
class DeliveryResult:
    """One attempt's outcome. ``retryable`` failures are retried; others fail the job.

    ``throttled`` says the channel asked us to slow down (a 429, a Retry-After on a 503, or a
    rate limit that ran out even on a success): the whole target is suspended until
    ``throttled_until``, or for a growing back-off when the channel named no time, and a
    throttled failure is tried again then without spending the job's attempt budget.
    """

    succeeded: bool
    status_code: int | None = None
    external_url: str | None = None
    error: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    raw_meta: dict[str, Any] = field(default_factory=dict)
    throttled: bool = False
    throttled_until: datetime | None = None
    # The channel says the destination no longer exists (410 Gone): the target is deactivated.
    target_gone: bool = False
    # The channel answered that it did not act on the request (a refusal such as a 4xx, or a
    # throttle), so nothing was posted whatever the channel's resend safety. Left False, a request
    # that went out is taken to have maybe reached the channel.
    refused: bool = False


@dataclass(frozen=True)
class ResendSafety:
    """How a channel keeps a second request for the same job from posting twice.

    - ``idempotency_key``: the channel keeps the key each request carries (the job id) and answers
      a repeat with the first result: Mastodon's ``Idempotency-Key`` (for ``key_lifetime``
      seconds), a webhook's ``webhook-id``, a feed entry's guid. After the key may have expired, a
      job that may have posted is never sent again by itself.
    - ``collision_check``: the adapter checks, before re-posting, whether its earlier attempt
      posted (Bluesky reads the record the job's record key names).
    - ``none``: nothing can (X): an attempt that may have reached the channel is never sent again
      by itself; it ends ``DELIVERY_OUTCOME_UNKNOWN`` for a person to check and redrive.
    """

    mechanism: Literal["idempotency_key", "collision_check", "none"]
    key_lifetime: float | None = None  # seconds; None: as long as it matters

    @property
    def resend_is_unsafe(self) -> bool:
        return self.mechanism == "none"


@dataclass(frozen=True)
class AttemptInfo:
    """What an adapter may want to know about the attempt it is making."""

    number: int = 1
    # An earlier attempt of this job may have reached the channel (its answer was lost, or its
    # worker died): a collision-checking channel looks before posting again.
    may_have_posted_before: bool = False


FIRST_ATTEMPT = AttemptInfo()

# Set by the worker for each delivery.
current_attempt: ContextVar[AttemptInfo] = ContextVar("current_attempt", default=FIRST_ATTEMPT)


@dataclass(frozen=True)
class SealedConfig:
    """A target's config split at registration: ``config`` is stored in clear and shown to
    callers; ``secrets`` are encrypted with the target's other secrets and come back to
    ``deliver`` in ``DeliveryTarget.secrets``."""

    config: dict[str, Any]
    secrets: dict[str, str] = field(default_factory=dict, repr=False)


class Progress(enum.Enum):
    """How far a delivery got, for the receipt of an attempt cancelled in flight."""

    NOT_SENT = "the request had not been sent"
    MAYBE_SENT = "the request may have been sent"
    SENT = "the request had been sent"


# Set by an adapter as its delivery goes out (MAYBE_SENT as it starts sending, SENT once the
# channel answers, NOT_SENT again if no connection could be made); the worker reads it when it
# cancels the attempt.
delivery_progress: ContextVar[Progress] = ContextVar("delivery_progress", default=Progress.NOT_SENT)


def _answered() -> None:
    delivery_progress.set(Progress.SENT)


# What the current delivery must not leak: the worker starts it with the target's secrets, and an
# adapter adds those it comes by as it delivers (a login session's tokens) with declare_secrets, so
# that they are scrubbed from the attempt's result and a crash's traceback like the target's.
delivery_secrets: ContextVar[list[str] | None] = ContextVar("delivery_secrets", default=None)


def declare_secrets(*values: str) -> None:
    """Have the worker scrub ``values`` from this delivery's result, as it does target secrets."""
    declared = delivery_secrets.get()
    if declared is not None:
        declared.extend(value for value in values if value)


@dataclass(frozen=True)
class AdapterOptions:
    allow_private_targets: bool = False
    timeout: float = 15.0  # seconds for a whole delivery: connect, send, response headers and body
    ca_bundle: str | None = None  # PEM file of CAs to trust instead of the certifi bundle
    feeds_dir: Path | None = None  # where feed channels write their files
    # Connections the process's HTTP client keeps open at once, in all and to one host.
    max_connections: int = DEFAULT_LIMIT
    max_connections_per_host: int = DEFAULT_LIMIT_PER_HOST

    def http_client(self) -> HttpClient:
        return HttpClient(
            allow_private=self.allow_private_targets,
            ca_bundle=self.ca_bundle,
            limit=self.max_connections,
            limit_per_host=self.max_connections_per_host,
        )


class Adapter(ABC):
    """A channel. Subclasses set ``channel_type`` and ``config_model`` and implement the two methods.

    ``secrets_model`` names the write-only credentials the channel accepts, if any.
    """

    channel_type: ClassVar[str]
    config_model: ClassVar[type[BaseModel]]
    secrets_model: ClassVar[type[BaseModel] | None] = None
    # Whether a target cannot work without secrets (a token); else they are optional.
    secrets_required: ClassVar[bool] = False
    # How a resend of an attempt that may have posted is kept from posting twice. A channel that
    # says nothing is taken to have no way: nothing that may have reached it is sent again.
    resend: ClassVar[ResendSafety] = ResendSafety("none")
    # A channel's own limits (its API's rate limit, say), used when a target names none.
    default_max_concurrency: ClassVar[int | None] = None
    default_rate_per_minute: ClassVar[float | None] = None

    # Class defaults, so that subclasses that never call Adapter.__init__ still work.
    _http: HttpClient | None = None
    _private_http: HttpClient | None = None
    # What the channel may keep in the database (a feed's entries); set by the registry.
    store: ChannelStore | None = None

    def __init__(self, options: AdapterOptions | None = None) -> None:
        self.options = options or AdapterOptions()

    @property
    def http(self) -> HttpClient:
        """The HTTP client for channels that speak HTTP: the registry gives every adapter the same
        one, so the process has one connection pool; an adapter on its own makes its own."""
        if self._http is None:
            self._http = self.options.http_client()
        return self._http

    @http.setter
    def http(self, client: HttpClient) -> None:
        self._http = client

    @property
    def private_http(self) -> HttpClient:
        """The client for targets registered where private addresses were allowed, when this
        process does not allow them itself (``http_for``)."""
        if self._private_http is None:
            self._private_http = replace(self.options, allow_private_targets=True).http_client()
        return self._private_http

    @private_http.setter
    def private_http(self, client: HttpClient) -> None:
        self._private_http = client

    def allows_private(self, target: DeliveryTarget | None) -> bool:
        """Whether a delivery to ``target`` may reach loopback, private and reserved addresses:
        the server that registered it allowed them, or this process allows them itself."""
        return self.options.allow_private_targets or (target is not None and target.private_addresses_allowed)

    def http_for(self, target: DeliveryTarget | None) -> HttpClient:
        """The HTTP client for requests on ``target``'s behalf (None: the process's own policy).

        A target registered where private addresses were allowed, delivered by a process that
        does not allow them, goes through a client of its own: a connection it opened to an
        address the process's client refuses is never reused for another target's request.
        """
        if self.options.allow_private_targets or not self.allows_private(target):
            return self.http
        return self.private_http

    async def send(self, method: str, url: str, *, target: DeliveryTarget | None = None, **options: Any) -> Answer:
        """A delivery's request for ``target`` (``HttpClient.request``'s arguments), through the
        client for its address policy (``http_for``), keeping ``delivery_progress``: maybe sent
        from the start, sent once the channel answers, and not sent again when no connection
        could be made (``TargetRefused``, ``ConnectError``, which it raises on)."""
        delivery_progress.set(Progress.MAYBE_SENT)
        try:
            return await self.http_for(target).request(method, url, on_answer=_answered, **options)
        except (TargetRefused, ConnectError):
            delivery_progress.set(Progress.NOT_SENT)
            raise

    def config_for_tenant(self, config: BaseModel, tenant_id: str) -> BaseModel:
        """The config as stored for a target of tenant ``tenant_id``, from the validated one: what
        the service checks (``check_target``), stores and shows. A channel whose targets could
        collide across tenants (a feed's file) sets its tenant's part here, never from what the
        caller gave. The default is ``config`` as it is."""
        return config

    async def check_target(self, config: BaseModel) -> None:  # noqa: B027 - optional hook
        """Refuse a target at registration, beyond what ``config_model`` validates."""

    async def read(self, target_id: UUID, config: dict[str, Any]) -> str | None:
        """What the channel publishes for reading (a feed's XML), for the MCP resource
        ``feed://{targetId}``; None for channels that only send."""
        return None

    def generate_secrets(self, given: Mapping[str, str]) -> dict[str, str]:
        """Secrets to make at registration that the caller did not give (shown to them once).
        The default makes none."""
        return {}

    def rotate_secrets(
        self, current: Mapping[str, str], previous_valid_until: datetime | None
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Replace a target's rotatable secret: (the secrets to store, the new ones to show once).

        The old one is kept, under a key starting ``previous``, until ``previous_valid_until``
        (None: not kept), so the receiver can switch over. The default has nothing to rotate.
        """
        raise DistributionError(
            "SECRET_ROTATION_UNSUPPORTED",
            f"Channel type {self.channel_type!r} has no secret that WordClaw can rotate.",
            "Register the target again with new secrets, then deactivate the old one.",
        )

    def seal_config(self, config: dict[str, Any]) -> SealedConfig:
        """Designate the secret parts of a validated config (as JSON), such as a token in a URL.

        The service calls it at registration, stores ``config`` and encrypts ``secrets``, and
        calls it again on stored configs before showing them, so it must leave its own output
        as it is. The default keeps the whole config in clear.
        """
        return SealedConfig(config)

    def policy_for(self, config: dict[str, Any], policy: TransformPolicy) -> TransformPolicy:
        """The policy a target's payload is made with: a channel whose limit depends on the
        target (an instance's own) sets ``max_length`` from ``config`` here. The default leaves
        the policy as it is."""
        return policy

    @abstractmethod
    def transform(self, content: ContentItem, policy: TransformPolicy) -> dict[str, Any]:
        """The payload for this channel. It is snapshotted when the job is queued."""

    def fit(self, content: ContentItem, policy: TransformPolicy) -> text.Cut | None:
        """How the payload's text fits the channel's limit, for a dry run to show; None when the
        channel has no limit and the policy sets none. The default measures the body against
        the policy's ``maxLength``."""
        return body_cut(content, policy)

    @abstractmethod
    async def deliver(
        self, payload: dict[str, Any], target: DeliveryTarget, *, message_id: str | None = None
    ) -> DeliveryResult:
        """Send one attempt.

        The worker passes the job id as ``message_id``, stable across retries, so channels with
        an idempotency key can use it; called without one, a fresh id is used.
        """

    async def aclose(self) -> None:
        """Release connections. Subclasses that override it call it too."""
        for client in (self._http, self._private_http):
            if client is not None:
                await client.aclose()


def body_source(content: ContentItem, policy: TransformPolicy) -> str:
    """The Markdown a body is made from: the whole body or, with ``excerptOnly``, the summary, else
    the body's first paragraph; never the full body."""
    if not policy.excerpt_only:
        return content.body
    return content.summary or text.first_paragraph(content.body)


def body_cut(content: ContentItem, policy: TransformPolicy) -> text.Cut | None:
    """The body cut to the policy's ``maxLength`` (in characters, at the end of a word), if it sets one.

    Markdown and HTML bodies are cut in their Markdown source (HTML cannot be cut safely);
    plain text is cut as it is sent.
    """
    if not policy.max_length:
        return None
    source = body_source(content, policy)
    if policy.output_format == "plaintext":
        source = text.markdown_to_text(source)
    return text.cut(source, text.Limit("characters", policy.max_length))


def render_body(content: ContentItem, policy: TransformPolicy) -> str:
    fitted = body_cut(content, policy)
    if policy.output_format == "plaintext":
        return fitted.text if fitted else text.markdown_to_text(body_source(content, policy))
    markdown = fitted.text if fitted else body_source(content, policy)
    return text.markdown_to_html(markdown) if policy.output_format == "html" else markdown


def canonical_link(content: ContentItem, policy: TransformPolicy) -> str | None:
    """The item's canonical URL with the policy's UTM parameters, or None if it is not to be sent."""
    if not (policy.include_canonical_url and content.canonical_url):
        return None
    if not policy.utm:
        return content.canonical_url
    parts = urlsplit(content.canonical_url)
    query = [
        (key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if not key.startswith("utm_")
    ]
    query += [(f"utm_{key}", value) for key, value in policy.utm.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def attribution(content: ContentItem) -> str | None:
    """ "By <author> · <license>", from the item's metadata, as far as it has them."""
    return text.attribution_line(content.metadata)


def social_post(content: ContentItem, policy: TransformPolicy, limit: text.Limit) -> text.Cut:
    """A social network's post: the title and the summary (or the body's first paragraph) as
    plain text, cut to fit ``limit`` at the end of a word, then the hashtags, the attribution
    and the canonical link, kept whole after the cut."""
    parts = [content.title]
    if not policy.include_body:
        parts.append(content.summary or "")
    else:  # a post is never the whole body: its excerpt
        excerpt = policy.model_copy(update={"excerpt_only": True})
        parts.append(text.markdown_to_text(body_source(content, excerpt)))
    tail = []
    if policy.hashtags:
        tail.append(" ".join(f"#{tag}" for tag in policy.hashtags))
    if policy.include_attribution and (line := attribution(content)):
        tail.append(line)
    if link := canonical_link(content, policy):
        tail.append(link)
    suffix = "".join(f"\n\n{part}" for part in tail)
    return text.cut("\n\n".join(part for part in parts if part), limit, suffix=suffix)


def render_content(content: ContentItem, policy: TransformPolicy) -> dict[str, Any]:
    """The channel-neutral rendering every adapter starts from (the webhook sends it as it is)."""
    rendered: dict[str, Any] = {
        "contentItemId": str(content.id),
        "version": content.version,
        "title": content.title,
        "summary": content.summary,
        "canonicalUrl": canonical_link(content, policy),
    }
    if policy.include_body:
        rendered["body"] = render_body(content, policy)
        rendered["bodyFormat"] = policy.output_format
    if policy.include_attribution and (line := attribution(content)):
        rendered["attribution"] = line
    if policy.hashtags:
        rendered["hashtags"] = policy.hashtags
    if policy.include_metadata:
        rendered["metadata"] = content.metadata
    return rendered


def adapter_classes() -> dict[str, type[Adapter]]:
    """Every installed adapter by channel type: the ``wordclaw.adapters`` entry points.

    One that cannot be loaded, or is not an adapter, is logged and left out rather than
    stopping the process: the other channels still work.
    """
    classes: dict[str, type[Adapter]] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry_point.load()
        except Exception:
            log.exception("adapter entry point %s could not be loaded; skipping it", entry_point.name)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            log.error("adapter entry point %s (%s) is not an Adapter; skipping it", entry_point.name, entry_point.value)
            continue
        classes[cls.channel_type] = cls
    return classes


class AdapterRegistry:
    """One instance of each adapter, shared by the plans service and the worker."""

    def __init__(self, options: AdapterOptions | None = None, store: ChannelStore | None = None) -> None:
        options = options or AdapterOptions()
        # One HTTP client for every channel, so the process has one connection pool and one
        # limit on connections, whatever the channels; and, where this process refuses private
        # addresses, a second for the targets registered where they were allowed, so that no
        # connection made under that policy serves a target under the strict one.
        self.http = options.http_client()
        self.private_http = (
            self.http
            if options.allow_private_targets
            else replace(options, allow_private_targets=True).http_client()
        )
        self._adapters = {name: cls(options) for name, cls in adapter_classes().items()}
        for adapter in self._adapters.values():
            adapter.http = self.http
            adapter.private_http = self.private_http
            adapter.store = store

    def register(self, adapter: Adapter) -> None:
        """Add or replace the adapter for its channel type (for embedding and benchmarks)."""
        self._adapters[adapter.channel_type] = adapter

    @property
    def channel_types(self) -> list[str]:
        return sorted(self._adapters)

    def get(self, channel_type: str) -> Adapter:
        try:
            return self._adapters[channel_type]
        except KeyError:
            raise errors.unsupported_channel_type(channel_type, self.channel_types) from None

    async def aclose(self) -> None:
        for adapter in self._adapters.values():
            await adapter.aclose()
        await self.http.aclose()
        await self.private_http.aclose()
