"""Refuse target URLs that reach loopback, private or otherwise non-public addresses.

Checked twice: when a target is registered (so a bad URL fails fast) and at delivery, where
the checked address is the one connected to, so DNS cannot change between check and use.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import anyio

from .errors import DistributionError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    # is_global is False for loopback, RFC 1918, link-local (cloud metadata), CGNAT,
    # unspecified and reserved ranges; multicast can be "global" so it is refused separately.
    return address.is_global and not address.is_multicast


def forbidden(host: str, address: IPAddress) -> DistributionError:
    return DistributionError(
        "TARGET_ADDRESS_FORBIDDEN",
        f"The target host {host} resolves to {address}, a loopback, private or reserved address.",
        "Use a publicly reachable URL. Deployments that deliver inside their own network can set "
        "WORDCLAW_ALLOW_PRIVATE_TARGETS=1.",
    )


@dataclass(frozen=True)
class PinnedURL:
    """A URL rewritten to a checked address, with what TLS and HTTP need to reach the name."""

    url: str
    host_header: str
    sni_hostname: str


async def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0]) for info in infos]


async def check_url(url: str, *, allow_private: bool, must_resolve: bool = False) -> list[PinnedURL]:
    """Raise TARGET_ADDRESS_FORBIDDEN if any address of the URL's host is not public.

    Returns the URL pinned to each address, in the resolver's order, for the caller to try in
    turn as any client would. Returns [] when the name does not resolve and ``must_resolve``
    is false: registration accepts a name that is down today, and delivery checks it again.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = await resolve(host, port)
    except OSError as exc:
        if must_resolve:
            raise DistributionError(
                "TARGET_UNRESOLVABLE",
                f"The target host {host} could not be resolved.",
                "Check the hostname in the target's URL.",
            ) from exc
        return []
    if not allow_private:
        for address in addresses:
            if not is_public(address):
                raise forbidden(host, address)
    host_header = parts.netloc.rpartition("@")[2]
    pinned = []
    for address in dict.fromkeys(addresses):  # getaddrinfo repeats an address per socket type
        literal = f"[{address}]" if address.version == 6 else str(address)
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        pinned.append(PinnedURL(url=url, host_header=host_header, sni_hostname=host))
    return pinned
