"""Email over SMTP: the item as a multipart/alternative message (plain text and HTML)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from collections.abc import Mapping
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
    ResendSafety,
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
    # SMTP keeps no idempotency key: a message whose end of DATA went unanswered may have been
    # accepted, and sending it again would mail every recipient twice.
    resend = ResendSafety("none")

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
            start_tls=False,  # by _start_tls, which tells a server without STARTTLS from a failure
            tls_context=self._tls(),
            timeout=self.options.timeout,
        )
        meta: dict[str, Any] = {"messageId": mid}
        accepted: tuple[dict[str, Any], str] | None = None
        try:
            async with smtp:
                if config.security == "starttls":
                    await _start_tls(smtp, config)
                if config.username:
                    await _login(smtp, config, password or "")
                # Only from here on can the server have accepted the message.
                delivery_progress.set(Progress.MAYBE_SENT)
                accepted = await smtp.send_message(message, sender=config.from_address, recipients=recipients)
                delivery_progress.set(Progress.SENT)
        except _Misconfigured as exc:
            return DeliveryResult(succeeded=False, error=str(exc), raw_meta=meta, refused=True)
        except aiosmtplib.SMTPAuthenticationError as exc:
            said = redaction.scrub(f"{exc.code} {exc.message}", [password or ""])
            return DeliveryResult(
                succeeded=False,
                status_code=exc.code,
                retryable=400 <= exc.code < 500,  # 454: a temporary failure; 530, 534, 535 are not
                error=f"SMTP_LOGIN_REFUSED: The SMTP server refused the login: {said}. {CHECK_LOGIN}",
                raw_meta=meta,
                refused=True,
            )
        except aiosmtplib.SMTPResponseException as exc:
            said = redaction.scrub(f"{exc.code} {exc.message}", [password or ""])
            return DeliveryResult(
                succeeded=False,
                status_code=exc.code,
                retryable=400 <= exc.code < 500,
                error=f"The SMTP server answered {said}",
                raw_meta=meta,
                refused=True,  # a server takes a message only by answering 250 to its end
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [error.code for error in exc.recipients]
            meta["refusedRecipients"] = _refusals({error.recipient: error for error in exc.recipients}, password)
            return DeliveryResult(
                succeeded=False,
                status_code=max(codes, default=None),
                retryable=all(400 <= code < 500 for code in codes),
                error="SMTP_RECIPIENTS_REFUSED: The SMTP server refused every recipient "
                f"({', '.join(map(str, codes))}); rawMeta.refusedRecipients has its answer for each.",
                raw_meta=meta,
                refused=True,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            said = redaction.scrub(str(exc), [password or ""])
            if accepted is None and _unverified(exc):
                return DeliveryResult(
                    succeeded=False,
                    error=f"SMTP_CERTIFICATE_INVALID: The SMTP server's certificate for {config.host!r} could not "
                    f"be verified ({said}). Name the host as its certificate does, or trust its CA "
                    "(WORDCLAW_CA_BUNDLE), then retry_plan.",
                    raw_meta=meta,
                    refused=True,  # the handshake failed before anything was sent
                )
            if accepted is None:
                return DeliveryResult(succeeded=False, retryable=True, error=f"{type(exc).__name__}: {said}")
            # The message was accepted; only the goodbye (QUIT) failed.
        assert accepted is not None
        refused, response = accepted
        if refused:  # some recipients got it: sending again would repeat it to them
            meta["refusedRecipients"] = _refusals(refused, password)
        return DeliveryResult(
            succeeded=True,
            status_code=250,
            external_url=f"mid:{mid.strip('<>')}",
            raw_meta={**meta, "response": response},
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


class _Misconfigured(Exception):
    """The server cannot serve the target as configured: every attempt would fail the same way."""


CHECK_LOGIN = "Check the target's username and password, and register it again; then retry_plan."


async def _start_tls(smtp: aiosmtplib.SMTP, config: EmailConfig) -> None:
    await smtp.ehlo()
    if not smtp.supports_extension("starttls"):
        raise _Misconfigured(
            f"SMTP_TLS_UNAVAILABLE: The SMTP server {config.host}:{config.port_or_default} does not offer "
            "STARTTLS, which the target's security 'starttls' requires. Register the target with security "
            "'tls' and port 465 if the server speaks TLS from the start; then retry_plan."
        )
    await smtp.starttls()


async def _login(smtp: aiosmtplib.SMTP, config: EmailConfig, password: str) -> None:
    if smtp.is_ehlo_or_helo_needed:  # again after STARTTLS, which forgets what the server offered
        await smtp.ehlo()
    if not smtp.supports_extension("auth"):
        raise _Misconfigured(
            f"SMTP_LOGIN_REFUSED: The SMTP server {config.host}:{config.port_or_default} offers no login "
            f"(AUTH) on this connection, and the target has a username. Servers often offer it only over TLS: "
            "use security 'starttls' or 'tls', or register the target without a username; then retry_plan."
        )
    assert config.username is not None
    await smtp.login(config.username, password)


def _refusals(refused: Mapping[str, Any], password: str | None) -> dict[str, str]:
    """Each refused recipient with the server's answer, e.g. '550 5.1.1 No such user'."""
    return {
        address: redaction.scrub(f"{answer.code} {answer.message}", [password or ""])
        for address, answer in refused.items()
    }


def _unverified(exc: BaseException) -> bool:
    """Whether ``exc`` comes of the server's certificate failing verification (aiosmtplib wraps
    the handshake's error when the connection starts with TLS)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


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
