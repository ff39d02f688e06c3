"""Email over SMTP: the item as a multipart/alternative message (plain text and HTML)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Literal

import aiosmtplib
import anyio
import certifi
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from wordclaw_mcp import netguard, redaction
from wordclaw_mcp.adapters import (
    Adapter,
    DeliveryResult,
    DeliveryTarget,
    Progress,
    attribution,
    canonical_link,
    delivery_progress,
    render_body,
)
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import ContentItem, TransformPolicy

SMTP_PORTS = {"none": 25, "starttls": 587, "tls": 465}


def _address(value: str) -> str:
    # A plain check: what SMTP servers refuse outright, and header injection.
    if "@" not in value or any(c in value for c in "\r\n<>,;") or value.startswith("@") or value.endswith("@"):
        raise ValueError(f"{value!r} is not an email address")
    return value


class EmailConfig(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    host: str = Field(min_length=1, max_length=253, description="The SMTP server.")
    port: int | None = Field(None, ge=1, le=65535, description="Default: 465 for tls, 587 for starttls, 25 for none.")
    security: Literal["none", "starttls", "tls"] = "starttls"
    username: str | None = None
    from_address: str = Field(alias="from", description="The sender, e.g. news@example.com.")
    to: list[str] = Field(min_length=1, max_length=100)
    cc: list[str] = Field(default_factory=list, max_length=100)
    bcc: list[str] = Field(default_factory=list, max_length=100)
    reply_to: str | None = None
    list_unsubscribe: str | None = Field(None, description="A mailto: or https: URL for the List-Unsubscribe header.")

    @field_validator("from_address", "reply_to")
    @classmethod
    def _one(cls, value: str | None) -> str | None:
        return None if value is None else _address(value)

    @field_validator("to", "cc", "bcc")
    @classmethod
    def _many(cls, values: list[str]) -> list[str]:
        return [_address(value) for value in values]

    @field_validator("list_unsubscribe")
    @classmethod
    def _unsubscribe(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith(("mailto:", "https://")) or any(c in value for c in "\r\n<>")):
            raise ValueError("must be a mailto: or https: URL")
        return value

    @property
    def port_or_default(self) -> int:
        return self.port or SMTP_PORTS[self.security]


class EmailSecrets(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    password: str = Field(min_length=1)


class EmailAdapter(Adapter):
    channel_type = "email"
    config_model = EmailConfig
    secrets_model = EmailSecrets

    async def check_target(self, config: BaseModel) -> None:
        assert isinstance(config, EmailConfig)
        port = config.port_or_default
        await netguard.check_url(f"smtp://{config.host}:{port}", allow_private=self.options.allow_private_targets)

    def transform(self, content: ContentItem, policy: TransformPolicy) -> dict[str, Any]:
        footer = [line for line in (attribution(content) if policy.include_attribution else None,) if line]
        link = canonical_link(content, policy)
        if not policy.include_body:  # title, summary and link only
            policy = policy.model_copy(update={"excerpt_only": True})
        plain = render_body(content, policy.model_copy(update={"output_format": "plaintext"}))
        html = render_body(content, policy.model_copy(update={"output_format": "html"}))
        if link:
            plain += f"\n\n{link}"
            html += f'<p><a href="{_attr(link)}">{_text(link)}</a></p>\n'
        if footer:
            plain += "\n\n" + "\n".join(footer)
            html += "".join(f"<p>{_text(line)}</p>\n" for line in footer)
        return {"subject": content.title, "text": plain, "html": html}

    async def deliver(
        self, payload: dict[str, Any], target: DeliveryTarget, *, message_id: str | None = None
    ) -> DeliveryResult:
        config = EmailConfig.model_validate(target.config)
        password = target.secrets.get("password")
        domain = config.from_address.rpartition("@")[2]
        # The job id, the same on every attempt, so mail clients can tell a repeat for what it is.
        mid = f"<{message_id or uuid.uuid4().hex}@{domain}>"
        message = _message(payload, config, mid)
        recipients = [*config.to, *config.cc, *config.bcc]
        try:
            sock = await self._connect(config, allow_private=self.allows_private(target))
        except DistributionError as exc:
            return DeliveryResult(
                succeeded=False, retryable=exc.code == "TARGET_UNRESOLVABLE", error=f"{exc.code}: {exc.message}"
            )
        except OSError as exc:
            return DeliveryResult(succeeded=False, retryable=True, error=f"Cannot connect to {config.host}: {exc}")
        smtp = aiosmtplib.SMTP(
            hostname=config.host,  # for TLS, which verifies this name; the socket is already connected
            sock=sock,
            use_tls=config.security == "tls",
            start_tls=config.security == "starttls",
            tls_context=self._tls(),
            timeout=self.options.timeout,
        )
        delivery_progress.set(Progress.MAYBE_SENT)
        try:
            async with smtp:
                if config.username:
                    await smtp.login(config.username, password or "")
                _errors, response = await smtp.send_message(message, sender=config.from_address, recipients=recipients)
        except aiosmtplib.SMTPResponseException as exc:
            said = redaction.scrub(f"{exc.code} {exc.message}", [password or ""])
            return DeliveryResult(
                succeeded=False,
                status_code=exc.code,
                retryable=400 <= exc.code < 500,
                error=f"The SMTP server answered {said}",
                raw_meta={"messageId": mid},
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [error.code for error in exc.recipients]
            return DeliveryResult(
                succeeded=False,
                status_code=max(codes, default=None),
                retryable=all(400 <= code < 500 for code in codes),
                error=f"The SMTP server refused every recipient ({', '.join(map(str, codes))}).",
                raw_meta={"messageId": mid},
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            said = redaction.scrub(str(exc), [password or ""])
            return DeliveryResult(succeeded=False, retryable=True, error=f"{type(exc).__name__}: {said}")
        delivery_progress.set(Progress.SENT)
        return DeliveryResult(
            succeeded=True,
            status_code=250,
            external_url=f"mid:{mid.strip('<>')}",
            raw_meta={"messageId": mid, "response": response},
        )

    async def _connect(self, config: EmailConfig, *, allow_private: bool) -> socket.socket:
        """A connected socket to the first checked address of the server that answers.

        The addresses are checked as for HTTP (wordclaw_mcp/netguard.py), under the target's
        policy, and only a checked one is connected to; TLS still verifies the server's name.
        Every delivery connects afresh, so no socket outlives the policy it was checked under.
        """
        port = config.port_or_default
        try:
            addresses = await netguard.resolve(config.host, port)
        except OSError as exc:
            raise netguard.unresolvable(config.host) from exc
        for address in addresses:
            netguard.check_address(config.host, address, allow_private=allow_private)
        last: OSError | None = None
        loop = asyncio.get_running_loop()
        for address in dict.fromkeys(addresses):
            sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                with anyio.fail_after(self.options.timeout):
                    await loop.sock_connect(sock, (str(address), port))
                return sock
            except (OSError, TimeoutError) as exc:
                sock.close()
                last = exc if isinstance(exc, OSError) else OSError(f"timed out connecting to {address}")
        raise last or OSError("no address")

    def _tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.options.ca_bundle or certifi.where())


def _message(payload: dict[str, Any], config: EmailConfig, mid: str) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = payload["subject"]
    message["From"] = config.from_address
    message["To"] = ", ".join(config.to)
    if config.cc:
        message["Cc"] = ", ".join(config.cc)
    if config.reply_to:
        message["Reply-To"] = config.reply_to
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = mid
    if config.list_unsubscribe:
        message["List-Unsubscribe"] = f"<{config.list_unsubscribe}>"
    message.set_content(payload["text"])
    message.add_alternative(payload["html"], subtype="html")
    return message


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _attr(value: str) -> str:
    return _text(value).replace('"', "&quot;")
