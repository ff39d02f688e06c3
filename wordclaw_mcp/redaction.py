"""Keeping secrets out of what is stored and shown: redacted URLs, and scrubbing of echoed secrets.

A secret rarely comes back whole. A server that rejects a signature may quote the key's base64
without its ``whsec_`` prefix, an error may quote a URL's token without the rest of the URL, and
either may arrive percent-encoded or JSON-escaped (PHP writes ``/`` as ``\\/``). A stored response
body is cut at a limit, which may fall inside an echoed secret. So scrubbing replaces every
meaningful fragment of a secret, in each of those forms, and the opening of one that a text ends with.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit, urlunsplit

REDACTED = "[redacted]"

# A fragment shorter than this is too likely to be ordinary text ("1", "json", "true"): replacing
# it everywhere would mangle receipts while protecting nothing. Whole secrets are always replaced.
MIN_FRAGMENT = 8

# Channels that put the credential in the URL's path. The named group ``secret`` is the part
# that grants access; the rest (ids, workspace names) is kept so the target stays recognisable.
# Matched on the path alone, so a proxy or a self-hosted relay with the same layout is covered.
SECRET_PATHS: tuple[re.Pattern[str], ...] = (
    re.compile(r"^/services/T[A-Za-z0-9]+/B[A-Za-z0-9]+/(?P<secret>[^/]+)"),  # Slack incoming webhooks
    re.compile(r"^/triggers/T[A-Za-z0-9]+/[^/]+/(?P<secret>[^/]+)"),  # Slack workflow triggers
    re.compile(r"^/api(?:/v\d+)?/webhooks/\d+/(?P<secret>[^/]+)"),  # Discord
    re.compile(r"^/webhookb2/(?P<secret>.+)"),  # Microsoft Teams connectors
)


def _secret_path_span(path: str) -> tuple[int, int] | None:
    for pattern in SECRET_PATHS:
        if match := pattern.match(path):
            return match.span("secret")
    return None


def redact_url(url: str) -> str:
    """``url`` as it may be stored and shown: user info dropped; query values, the fragment and
    any channel token in the path replaced by REDACTED. Applying it twice changes nothing more."""
    parts = urlsplit(url)
    path = parts.path
    if span := _secret_path_span(path):
        path = path[: span[0]] + REDACTED + path[span[1] :]
    query = "&".join(_redact_parameter(parameter) for parameter in parts.query.split("&")) if parts.query else ""
    fragment = REDACTED if parts.fragment else ""
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], path, query, fragment))


def _redact_parameter(parameter: str) -> str:
    name, equals, _value = parameter.partition("=")
    return f"{name}={REDACTED}" if equals else REDACTED


def public_url(url: str) -> str:
    """The endpoint to name in a receipt: no user info, query or fragment, and no path token."""
    parts = urlsplit(redact_url(url))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def url_secret_parts(url: str) -> set[str]:
    """The pieces of a URL that carry credentials: query values, the path token, the password."""
    parts = urlsplit(url)
    found = {parts.query, parts.fragment, parts.password or ""}
    for parameter in parts.query.split("&"):
        name, equals, value = parameter.partition("=")
        found.add(value if equals else name)
    if span := _secret_path_span(parts.path):
        token = parts.path[span[0] : span[1]]
        found.add(token)
        found.update(token.split("/"))
    return {part for part in found if part}


def fragments(secret: str) -> set[str]:
    """Every form in which ``secret``, or a meaningful part of it, may be echoed back."""
    parts = {secret}
    if secret.startswith("whsec_"):
        key = secret.removeprefix("whsec_")
        # The key without its prefix, as a server that decodes the secret would quote it.
        parts |= {key, key.rstrip("="), key.replace("+", "-").replace("/", "_").rstrip("=")}
    if urlsplit(secret).scheme in {"http", "https"}:
        parts |= url_secret_parts(secret)
    # A URL's parts arrive encoded: decode first, so every encoding of the plain value is covered.
    plain = parts | {unquote(part) for part in parts} | {unquote_plus(part) for part in parts}
    forms = set(plain)
    for part in plain:
        forms |= {quote(part, safe=""), quote(part), quote_plus(part, safe=""), quote_plus(part)}
        escaped = json.dumps(part)[1:-1]
        forms |= {escaped, escaped.replace("/", "\\/"), json.dumps(part, ensure_ascii=False)[1:-1]}
    return {form for form in forms if form == secret or len(form) >= MIN_FRAGMENT}


def scrub(value: Any, secrets: Iterable[str]) -> Any:
    """``value`` (a string, or JSON-like data) with every fragment of every secret replaced."""
    return _replace(value, _needles(tuple(secret for secret in secrets if secret)))


# Working the fragments out took a sixth of the worker's time per delivery (py-spy), while a
# worker sees the same few targets' secrets over and over.
@functools.lru_cache(maxsize=1024)
def _needles(secrets: tuple[str, ...]) -> tuple[str, ...]:
    needles: set[str] = set()
    for secret in secrets:
        needles |= fragments(secret)
    # Longest first, so a whole secret is replaced as one before its parts are looked for.
    return tuple(sorted(needles, key=len, reverse=True))


def _cut_tail(text: str, needles: tuple[str, ...]) -> str:
    """``text`` without the opening of a secret it ends with: what a cut-off body keeps of one."""
    # A text that ends with at least MIN_FRAGMENT characters of a secret ends with one of the
    # secret's MIN_FRAGMENT-long windows: one set look-up rules out nearly every text, which is
    # all a delivery's results pay (scanning every needle cost 170 µs a delivery).
    if len(text) < MIN_FRAGMENT or text[-MIN_FRAGMENT:] not in _windows(needles):
        return text
    for needle in needles:
        if _is_url(needle):
            continue  # a URL's opening is its public part; its secret parts are needles of their own
        # Every start from which the rest of the text is a proper opening of the needle, longest first.
        for start in range(max(0, len(text) - len(needle) + 1), len(text) - MIN_FRAGMENT + 1):
            if needle.startswith(text[start:]):
                return text[:start] + REDACTED
    return text


@functools.lru_cache(maxsize=1024)
def _windows(needles: tuple[str, ...]) -> frozenset[str]:
    return frozenset(
        needle[start : start + MIN_FRAGMENT]
        for needle in needles
        if not _is_url(needle)
        for start in range(len(needle) - MIN_FRAGMENT + 1)
    )


@functools.lru_cache(maxsize=4096)
def _is_url(needle: str) -> bool:
    return unquote_plus(needle).lower().startswith(("http://", "https://"))


def _replace(value: Any, needles: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        for needle in needles:
            value = value.replace(needle, REDACTED)
        return _cut_tail(value, needles)
    if isinstance(value, Mapping):
        return {key: _replace(item, needles) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace(item, needles) for item in value]
    return value
