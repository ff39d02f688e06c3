"""What the RSS and Atom channels share: entries kept in PostgreSQL, one per content item, and the
whole feed written again, atomically, after each delivery. Not a channel by itself."""

from __future__ import annotations

import os
import re
import tempfile
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar
from uuid import UUID

import anyio
from feedgen.feed import FeedGenerator
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator
from pydantic.alias_generators import to_camel

from wordclaw_mcp.adapters import (
    Adapter,
    DeliveryResult,
    DeliveryTarget,
    ResendSafety,
    attribution,
    canonical_link,
    render_body,
)
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import ContentItem, TransformPolicy


class FeedConfig(BaseModel):
    """A feed target's config as an agent gives it."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    path: str = Field(description="The feed file, relative to the tenant's folder in WORDCLAW_FEEDS_DIR.")
    title: str = Field(min_length=1, max_length=500)
    link: HttpUrl = Field(description="The site the feed belongs to.")
    feed_url: HttpUrl | None = Field(
        None, description="Where readers fetch the feed: its self link, and the receipt's externalUrl."
    )
    description: str = Field("", max_length=5000)
    max_items: int = Field(50, ge=1, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _no_file(cls, data: Any) -> Any:
        if cls is FeedConfig and isinstance(data, dict) and "file" in data:
            raise ValueError("file is chosen by WordClaw (the tenant's folder, then path): leave it out")
        return data

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return _relative_path(value)

    @field_validator("title", "description")
    @classmethod
    def _xml_text(cls, value: str) -> str:
        # Refused from agents; a config stored before is rendered without the character (render).
        if cls is FeedConfig and _NOT_XML.search(value):
            raise ValueError("holds a control character XML cannot carry (only tab, line feed and carriage return)")
        return value


class StoredFeedConfig(FeedConfig):
    """A feed target's config as stored: with the file it writes, relative to WORDCLAW_FEEDS_DIR.
    That is ``<tenant>/<path>``, or, for a target registered before tenants had folders, where it
    wrote then (migration 0014). A unique index keeps each file to one target."""

    file: str

    @field_validator("file")
    @classmethod
    def _relative_file(cls, value: str) -> str:
        return _relative_path(value)


# What XML 1.0 cannot carry at all.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml(value: str) -> str:
    return _NOT_XML.sub("", value)


def _relative_path(value: str) -> str:
    """``value`` as a path, or ValueError if it could leave the feeds folder; 'a//b' is 'a/b'."""
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or not path.name:
        raise ValueError("must be a relative path inside the feeds directory, without '..'")
    if any(ord(character) < 0x20 or ord(character) == 0x7F for character in value):
        raise ValueError("must not hold control characters (a line break, a NUL)")
    return str(path)


class FeedAdapter(Adapter):
    config_model = FeedConfig
    # A redelivery replaces the item's entry (its guid is the key, kept in our own database).
    resend = ResendSafety("idempotency_key")
    feed_format: ClassVar[str]  # "rss" or "atom"

    def config_for_tenant(self, config: BaseModel, tenant_id: str) -> StoredFeedConfig:
        """Each tenant's feeds in a folder of their own: two tenants' paths never name one file."""
        assert isinstance(config, FeedConfig)
        given = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return StoredFeedConfig.model_validate({**given, "file": f"{tenant_id}/{config.path}"})

    async def check_target(self, config: BaseModel) -> None:
        assert isinstance(config, StoredFeedConfig)
        folder = self._file(config).parent
        try:
            await anyio.Path(folder).mkdir(parents=True, exist_ok=True)
            writable = os.access(folder, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            raise DistributionError(
                "INVALID_TARGET_CONFIG",
                f"The feed's folder {config.path!r} cannot be written by WordClaw.",
                "Choose another path, or make the folder under WORDCLAW_FEEDS_DIR writable.",
            )

    def transform(self, content: ContentItem, policy: TransformPolicy) -> dict[str, Any]:
        html = render_body(content, policy.model_copy(update={"output_format": "html"})) if policy.include_body else ""
        return {
            # One entry per item, whatever its version: a new version or a redelivery replaces it.
            "guid": f"urn:uuid:{content.id}",
            "title": content.title,
            "link": canonical_link(content, policy),
            "summary": content.summary,
            "contentHtml": html,
            "author": (content.metadata.get("author") if policy.include_attribution else None) or None,
            "rights": attribution(content) if policy.include_attribution else None,
            "published": content.created_at.isoformat(),
            "updated": content.updated_at.isoformat(),
        }

    async def deliver(
        self, payload: dict[str, Any], target: DeliveryTarget, *, message_id: str | None = None
    ) -> DeliveryResult:
        if self.store is None:
            raise RuntimeError("a feed channel needs the registry's store")
        config = StoredFeedConfig.model_validate(target.config)
        file = self._file(config)

        async def publish(entries: list[dict[str, Any]]) -> None:
            try:
                await self._write(file, self.render(config, entries))
            except OSError as exc:
                raise _Unwritten(exc) from exc

        published = datetime.fromisoformat(payload["published"])
        try:
            await self.store.publish_feed_item(
                target.id, payload["guid"], payload, published, config.max_items, publish
            )
        except _Unwritten as exc:
            return DeliveryResult(succeeded=False, retryable=True, error=f"The feed file could not be written: {exc}")
        return DeliveryResult(
            succeeded=True,
            external_url=str(config.feed_url or config.link),
            raw_meta={"path": config.path, "file": config.file},
        )

    async def _write(self, file: Path, xml: str) -> None:
        await anyio.to_thread.run_sync(_write_atomically, file, xml)

    async def read(self, target_id: UUID, config: dict[str, Any]) -> str | None:
        if self.store is None:
            return None
        feed = StoredFeedConfig.model_validate(config)
        return self.render(feed, await self.store.feed_items(target_id, feed.max_items))

    def render(self, config: FeedConfig, entries: list[dict[str, Any]]) -> str:
        """The whole feed, newest entry first.

        Characters XML cannot carry (control characters but tab, line feed and carriage return:
        an item pasted from a terminal or a word processor may hold them) are left out of every
        entry and of the feed's own text (a config stored before they were refused), rather than
        failing the feed for ever.
        """
        config = config.model_copy(update={"title": _xml(config.title), "description": _xml(config.description)})
        entries = [{key: _xml(value) if isinstance(value, str) else value for key, value in e.items()} for e in entries]
        feed = FeedGenerator()
        feed.id(str(config.link))
        feed.title(config.title)
        if config.feed_url:  # first: feedgen's RSS <link> is the last link added, which must be the site
            feed.link(href=str(config.feed_url), rel="self")
        feed.link(href=str(config.link), rel="alternate")
        feed.description(config.description or config.title)
        feed.generator("WordClaw Distribution")
        for entry in reversed(entries):  # feedgen puts the last added first
            item = feed.add_entry()
            item.id(entry["guid"])
            item.guid(entry["guid"], permalink=False)
            item.title(entry["title"])
            if entry.get("link"):
                item.link(href=entry["link"])
            if entry.get("summary"):
                item.summary(entry["summary"])
            if entry.get("contentHtml"):
                item.content(entry["contentHtml"], type="CDATA" if self.feed_format == "rss" else "html")
            if entry.get("author"):
                item.author(name=entry["author"], email=None)
            item.published(entry["published"])
            item.updated(entry["updated"])
        if entries:
            feed.updated(max(entry["updated"] for entry in entries))
        raw = feed.rss_str(pretty=True) if self.feed_format == "rss" else feed.atom_str(pretty=True)
        return raw.decode()

    def _file(self, config: StoredFeedConfig) -> Path:
        base = (self.options.feeds_dir or Path("feeds")).resolve()
        path = base / config.file
        # No symbolic link below the feeds folder: one could lead out of it, into another
        # tenant's folder, or make two feeds' files one.
        if path.resolve() != path:
            raise DistributionError(
                "INVALID_TARGET_CONFIG",
                f"The feed file {config.file!r} is reached through a symbolic link in the feeds folder.",
                "Use another path, or ask the operator to replace the link under WORDCLAW_FEEDS_DIR with a folder.",
            )
        return path


class _Unwritten(Exception):
    """The feed's file could not be written (its OSError is the cause): the entry is not kept."""


def _write_atomically(path: Path, content: str) -> None:
    """Write a temporary file beside ``path`` and rename it over: readers see the old feed or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, draft = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.chmod(draft, 0o644)
        os.replace(draft, path)
    except BaseException:
        Path(draft).unlink(missing_ok=True)
        raise
