"""The worker's one HTTP client, shared by every HTTP channel: on aiohttp, and safe to point at user URLs.

A target URL is the user's to choose, so the client must not become a way into the deployment's
own network (SSRF). Names are resolved by ``CheckedResolver``, which passes every address through
``netguard.check_address`` and hands the connector only addresses that passed: what is checked is
what is connected to, with no second lookup for DNS to answer differently. An address literal in
the URL never reaches a resolver, so it is checked before the request. The URL keeps its
hostname, so TLS verifies the certificate against that name, and the connector's pool is keyed
by hostname, port and TLS context: a connection verified for one name is never used for another.

aiohttp and not httpx, on measured evidence (bench/http_clients.py, 2-core machine, 5,000 POSTs
at concurrency 20): httpx manages about a twentieth of aiohttp's POSTs/s, httpx over aiohttp's
transport about a third, and this layer, checks included, 0.8 to 1 times aiohttp's.
"""

from __future__ import annotations

import codecs
import ipaddress
import json as jsonlib
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio
import certifi
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from . import netguard, redaction
from .errors import DistributionError

# What a receipt keeps of a body, and so all that is read by default: a body could be endless.
DEFAULT_BODY_LIMIT = 2048
# Connections open at once, over all hosts and to one host (hostname, port and TLS). The
# per-host figure is what httpx's pool allowed each hostname before, so no deployment that
# worked then waits for a connection now; either wait counts against the request's deadline.
DEFAULT_LIMIT = 256
DEFAULT_LIMIT_PER_HOST = 100
# Hosts whose idle connections are kept for the next request to them; as many as httpx pools
# were kept before.
DEFAULT_IDLE_HOSTS = 64
USER_AGENT = "WordClaw-Distribution/0.1"

Lookup = Callable[[str, int], Awaitable[list[netguard.IPAddress]]]


class HttpError(Exception):
    """A request that got no answer. Its text names at most the scheme, host and port: never
    the path, the query or a header, where credentials travel, so it is safe to store."""


class TargetRefused(HttpError):
    """Nothing was sent: the URL is refused (``code`` TARGET_ADDRESS_FORBIDDEN, INVALID_URL) or
    its host did not resolve (TARGET_UNRESOLVABLE)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_error(cls, error: DistributionError) -> TargetRefused:
        return cls(error.code, error.message)


class ConnectError(HttpError):
    """Nothing was sent: no checked address accepted a connection, or TLS verification failed."""


class DeadlineExceeded(HttpError):
    """The whole exchange did not finish in time; the request may have been sent."""


class TransportError(HttpError):
    """The connection failed after it was made, or the answer was not HTTP; it may have been sent."""


@dataclass(frozen=True)
class Answer:
    """What the server said, with at most the requested number of bytes of its body."""

    status: int
    reason: str
    # Case-insensitive, as HTTP header names are (a multidict.CIMultiDictProxy).
    headers: Mapping[str, str] = field(repr=False)
    text: str
    # The body went on past what was read; ``text`` is its beginning.
    truncated: bool = False

    def json(self) -> Any:
        if self.truncated:
            raise ValueError("the answer's body was longer than the bytes read, so it is not whole JSON")
        return jsonlib.loads(self.text)

    def json_or_none(self) -> Any:
        """The body as JSON, or None if it is not (whole) JSON: for reading an API's error body."""
        try:
            return self.json()
        except ValueError:
            return None


class CheckedResolver(AbstractResolver):
    """Resolves as ``netguard`` does, and refuses the whole name if any address is not allowed.

    The connector connects only to what this returns. With its DNS cache off it asks again for
    every new connection, so a name that now resolves somewhere private is refused even if an
    earlier answer passed.
    """

    def __init__(self, *, allow_private: bool, lookup: Lookup | None = None) -> None:
        self._allow_private = allow_private
        self._lookup = lookup

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[ResolveResult]:
        # Looked up when called, not bound when built, so one stub of netguard.resolve covers
        # both the registration check and this resolver.
        lookup = self._lookup or netguard.resolve
        try:
            addresses = await lookup(host, port)
        except OSError as exc:
            # Not an OSError: aiohttp would wrap that in a connection error and lose the code.
            raise netguard.unresolvable(host) from exc
        wanted = {socket.AF_INET: 4, socket.AF_INET6: 6}.get(family)
        results: list[ResolveResult] = []
        for address in dict.fromkeys(addresses):
            netguard.check_address(host, address, allow_private=self._allow_private)
            if wanted is None or address.version == wanted:
                results.append(
                    ResolveResult(
                        hostname=host,
                        host=str(address),
                        port=port,
                        family=socket.AF_INET if address.version == 4 else socket.AF_INET6,
                        proto=0,
                        flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                    )
                )
        if not results:
            raise netguard.unresolvable(host)
        return results

    async def close(self) -> None:
        pass


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, keeping idle connections for at most ``idle_hosts`` hosts.

    aiohttp limits the connections in use, not the idle ones: every host a worker delivers to
    would keep its connections open for the keep-alive time, and fanning out to many hosts
    would use up the process's file descriptors. The hosts idle longest lose theirs first.
    """

    def __init__(self, *, idle_hosts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._idle_hosts = idle_hosts

    # This reaches into aiohttp's pool (_release, and _conns: each key's idle connections);
    # the tests of the bound (tests/test_webhook_adapter.py) fail if a release changes them.
    def _release(self, key: Any, *args: Any, **kwargs: Any) -> None:
        super()._release(key, *args, **kwargs)
        pool = self._conns
        if key in pool:
            pool[key] = pool.pop(key)  # now the most recently used
        while len(pool) > self._idle_hosts:
            for protocol, _used in pool.pop(next(iter(pool))):
                protocol.close()


class HttpClient:
    """One ``aiohttp.ClientSession`` for the process, created in the running event loop on first
    use and closed by ``aclose()``; a request after that opens a new one."""

    def __init__(
        self,
        *,
        allow_private: bool = False,
        ca_bundle: str | None = None,
        limit: int = DEFAULT_LIMIT,
        limit_per_host: int = DEFAULT_LIMIT_PER_HOST,
        idle_hosts: int = DEFAULT_IDLE_HOSTS,
        lookup: Lookup | None = None,
    ) -> None:
        self.allow_private = allow_private
        self.ca_bundle = ca_bundle
        self.limit = limit
        self.limit_per_host = limit_per_host
        self.idle_hosts = idle_hosts
        self._lookup = lookup
        self._ssl: ssl.SSLContext | None = None
        self._session: aiohttp.ClientSession | None = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        timeout: float,  # noqa: ASYNC109 - the deadline is part of the request: aiohttp is given it too
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        json: Any = None,
        max_body: int = DEFAULT_BODY_LIMIT,
        on_answer: Callable[[], object] | None = None,
    ) -> Answer:
        """Send one request and read at most ``max_body`` bytes of the answer, all within ``timeout`` seconds.

        A 3xx is an answer like any other: redirects are not followed, as following one would
        skip the address check. ``on_answer`` is called as soon as the status line and headers
        have arrived, when the request has certainly been sent. Raises ``HttpError``.
        """
        target = self._checked(url)
        if json is not None:
            if body is not None:
                raise ValueError("pass body or json, not both")
            body = jsonlib.dumps(json, separators=(",", ":"), ensure_ascii=False).encode()
            headers = dict(headers or {})
            if not any(name.lower() == "content-type" for name in headers):
                headers["content-type"] = "application/json"
        session = self._session_now()
        # One deadline for the whole exchange, the lookup, the wait for a connection and the
        # body included: per-operation timeouts let a server that trickles out a byte at a time
        # hold a request for ever. Not rounded up to a whole second (aiohttp's default above
        # 5 s), so it is the deadline asked for. aiohttp's timer and not an anyio scope around
        # it: that would cost a sixth of a request's time on a fast endpoint.
        deadline = aiohttp.ClientTimeout(total=timeout, ceil_threshold=math.inf)
        try:
            async with session.request(
                method, target, headers=headers, data=body, allow_redirects=False, timeout=deadline
            ) as response:
                if on_answer is not None:
                    on_answer()
                text, truncated = await _read_text(response, max_body)
                if truncated:
                    # A connection with unread body cannot carry another request.
                    response.close()
                return Answer(response.status, response.reason or "", response.headers, text, truncated)
        except TimeoutError:  # aiohttp's ServerTimeoutError family among them
            raise DeadlineExceeded(f"No answer from {_origin(target)} within {timeout:g} s.") from None
        except DistributionError as exc:  # from CheckedResolver, unwrapped by aiohttp
            raise TargetRefused.from_error(exc) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.__cause__, DistributionError):
                raise TargetRefused.from_error(exc.__cause__) from None
            raise ConnectError(f"Cannot connect to {_origin(target)}: {_reason(exc)}") from None
        except (aiohttp.ClientError, OSError) as exc:
            # Some aiohttp errors quote the whole URL; whatever they say is scrubbed of it.
            said = redaction.scrub(str(exc), [url, str(target)])
            raise TransportError(f"{type(exc).__name__} from {_origin(target)}: {said}".rstrip(": ")) from None

    def _checked(self, url: str) -> yarl.URL:
        """``url`` as it goes on the wire, after the checks that need no lookup."""
        try:
            parsed = yarl.URL(url)  # aiohttp's own parser: what is checked is what it connects to
            host = parsed.raw_host
        except (ValueError, TypeError):
            raise TargetRefused("INVALID_URL", "The URL could not be parsed.") from None
        if parsed.scheme not in {"http", "https"} or not host:
            raise TargetRefused("INVALID_URL", "The URL must be http or https, with a host.")
        if parsed.raw_user is not None or parsed.raw_password is not None:
            # Never sent (aiohttp would turn it into basic auth), and never echoed.
            raise TargetRefused("INVALID_URL", "The URL carries a user name or password; they are never sent.")
        # aiohttp connects straight to any host that looks like an address, without asking the
        # resolver, so each of those is checked here. Its test is a heuristic: one it takes for an
        # address that is not one in canonical form (127.1, 2130706433) is refused, as the socket
        # layer could read it as an address nobody checked.
        if ":" in host or host.replace(".", "").isdigit():
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                raise TargetRefused(
                    "INVALID_URL", f"The URL's host {host} is not an IP address in canonical form, nor a name."
                ) from None
            try:
                netguard.check_address(host, address, allow_private=self.allow_private)
            except DistributionError as exc:
                raise TargetRefused.from_error(exc) from None
        # Path and query are sent as given, only escaping what may not appear raw: yarl's own
        # requoting would turn a %2F in a query into "/", and break URLs whose query is signed.
        raw = yarl.URL(url, encoded=True)
        wire = f"{parsed.scheme}://{parsed.raw_authority}{_escape(raw.raw_path) or '/'}"
        if raw.raw_query_string:
            wire += "?" + _escape(raw.raw_query_string)
        return yarl.URL(wire, encoded=True)

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if self._ssl is None:
                # Built once: loading the CA bundle is the slow part. WORDCLAW_CA_BUNDLE, else
                # certifi's; never SSL_CERT_FILE or the system store, which the environment controls.
                self._ssl = ssl.create_default_context(cafile=self.ca_bundle or certifi.where())
            connector = _Connector(
                idle_hosts=self.idle_hosts,
                limit=self.limit,
                limit_per_host=self.limit_per_host,
                resolver=CheckedResolver(allow_private=self.allow_private, lookup=self._lookup),
                # A cached answer would be used without being checked again.
                use_dns_cache=False,
                # The next address is tried 250 ms after the last, not once it fails, so a silent
                # address cannot use up the deadline of the others (aiohttp's default, relied on).
                happy_eyeballs_delay=0.25,
                ssl=self._ssl,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # No proxy from the environment (a proxy would connect to unchecked addresses), no .netrc.
                trust_env=False,
                # Only raw bytes are read, up to the limit: a compressed body could not be bounded.
                auto_decompress=False,
                headers={"accept-encoding": "identity", "user-agent": USER_AGENT},
                # Targets of different users share hosts; nothing one answer sets may ride on the next.
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None),  # each request brings its own deadline
            )
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            with anyio.CancelScope(shield=True):  # even when a cancelled caller is what lets go of it
                await session.close()


async def _read_text(response: aiohttp.ClientResponse, limit: int) -> tuple[str, bool]:
    """Up to ``limit`` bytes of the body, as text, and whether there was more; the rest is never read."""
    length = response.content_length
    if length is not None and length <= limit:
        # The parser stops at Content-Length, so this cannot read more; and it is the fast path.
        kept = await response.read()
        truncated = False
    else:
        kept = bytearray()
        while len(kept) < limit:
            chunk = await response.content.read(limit - len(kept))
            if not chunk:
                break
            kept += chunk
        truncated = not response.content.at_eof()
    try:
        decoder = codecs.getincrementaldecoder(response.charset or "utf-8")(errors="replace")
    except LookupError:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return decoder.decode(bytes(kept)), truncated  # not final: a character cut at the limit is dropped


def _escape(part: str) -> str:
    # Everything a URL may carry raw stays as it is, existing %-escapes included.
    return quote(part, safe="!#$%&'()*+,/:;=?@[]~")


def _origin(url: yarl.URL) -> str:
    return f"{url.scheme}://{url.raw_authority}"


def _reason(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return str(exc.certificate_error)
    return str(exc.os_error) or type(exc.os_error).__name__
