"""Errors an agent can cause: each has a stable code, a sentence, and a remediation."""

from __future__ import annotations

from typing import Any


class DistributionError(Exception):
    """A failure the caller can act on. ``code`` is stable API; the texts are for reading."""

    def __init__(self, code: str, message: str, remediation: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.remediation = remediation
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "remediation": self.remediation}
        if self.details:
            error["details"] = self.details
        return error


def not_found(kind: str, code: str, ident: object, remediation: str) -> DistributionError:
    return DistributionError(code, f"No {kind} with id {ident} exists.", remediation)


def content_item_not_found(ident: object) -> DistributionError:
    return not_found(
        "content item",
        "CONTENT_ITEM_NOT_FOUND",
        ident,
        "Create the item with upsert_content_item (omit id) and use the id it returns.",
    )


def target_not_found(ident: object) -> DistributionError:
    return not_found(
        "distribution target",
        "TARGET_NOT_FOUND",
        ident,
        "Call list_targets for the ids that exist, or register_target to create one.",
    )


def plan_not_found(ident: object) -> DistributionError:
    return not_found(
        "distribution plan",
        "PLAN_NOT_FOUND",
        ident,
        "Use the id that create_distribution_plan returned.",
    )


def unsupported_channel_type(channel_type: str, supported: list[str]) -> DistributionError:
    return DistributionError(
        "UNSUPPORTED_CHANNEL_TYPE",
        f"No adapter handles channel type {channel_type!r}.",
        f"Use one of: {', '.join(supported)}; a channel of another kind needs its adapter's package installed.",
        supportedChannelTypes=supported,
    )


def validation_error(message: str, **details: Any) -> DistributionError:
    return DistributionError(
        "VALIDATION_ERROR",
        message,
        "Correct the named arguments to match the tool's input schema and call again.",
        **details,
    )


class DatabaseUnavailable(DistributionError):
    def __init__(self, reason: str) -> None:
        super().__init__(
            "DATABASE_UNAVAILABLE",
            f"The distribution database could not be reached: {reason}",
            "Retry shortly. If it persists, check WORDCLAW_DATABASE_URL (or unset it to use the embedded "
            "database) and that the database server is running.",
        )


class SchemaTooNew(DistributionError):
    def __init__(self, found: int, supported: int) -> None:
        super().__init__(
            "SCHEMA_TOO_NEW",
            f"The database schema is version {found}, newer than this release supports ({supported}).",
            "Upgrade wordclaw-distribution on this host to the release that migrated the database.",
        )


def describe_validation(errors: list[dict[str, Any]], root: str | None = None) -> str:
    """Pydantic errors as 'where: what' without the rejected values, which may be secrets."""
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()))
        if root:
            location = f"{root}.{location}" if location else root
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)
