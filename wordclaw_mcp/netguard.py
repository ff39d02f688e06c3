"""Refuse target URLs that reach loopback, private or otherwise non-public addresses.

Checked twice: when a target is registered (so a bad URL fails fast), and at delivery by the
worker's HTTP client (wordclaw_mcp/http.py), whose resolver hands its connections only addresses
that ``check_address`` passed, so DNS cannot change between check and use.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import anyio

from .errors import DistributionError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# Ranges refused whatever the running Python's is_global says: its tables differ between
# patch releases, and several of these are missing from older ones.
NON_GLOBAL_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, where cloud metadata lives
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and broadcast
        "::/128",
        "::1/128",
        "::/96",  # IPv4-compatible, deprecated: nothing public is reached this way
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "64:ff9b:1::/48",  # local-use NAT64: translated inside someone's own network
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, Teredo (2001::/32) among them
        "2001:db8::/32",
        "3fff::/20",  # documentation
        "5f00::/16",  # SRv6 segment identifiers
        "fc00::/7",  # unique local
        "fe80::/10",
        "fec0::/10",  # site-local, deprecated
        "ff00::/8",  # multicast
    )
)
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that traffic to ``address`` is delivered to, if it embeds one.

    IPv4-mapped addresses are the IPv4 host itself; a NAT64 gateway translates the well-known
    prefix to the embedded address; a 6to4 relay tunnels to the embedded router.
    """
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and (inner := embedded_ipv4(address)) is not None:
        # The wrapper only says how to get there: the embedded address is where the request lands.
        address = inner
    if any(address in network for network in NON_GLOBAL_NETWORKS if network.version == address.version):
        return False
    # is_global also covers whatever the table above misses that the running Python knows about;
    # multicast can be "global", so it is refused separately.
    return address.is_global and not address.is_multicast


def forbidden(host: str, address: IPAddress) -> DistributionError:
    return DistributionError(
        "TARGET_ADDRESS_FORBIDDEN",
        f"The target host {host} resolves to {address}, a loopback, private or reserved address.",
        "Use a publicly reachable URL. To deliver inside your own network (a webhook on this machine, say), set "
        "WORDCLAW_ALLOW_PRIVATE_TARGETS=1 for the MCP server that registers the target (in the MCP client's env "
        "for a stdio server), restart it and register the target again: the target keeps that permission, so "
        "workers deliver it without the setting.",
    )


def unresolvable(host: str) -> DistributionError:
    return DistributionError(
        "TARGET_UNRESOLVABLE",
        f"The target host {host} could not be resolved.",
        "Check the hostname in the target's URL.",
    )


def check_address(host: str, address: IPAddress, *, allow_private: bool) -> None:
    """Raise TARGET_ADDRESS_FORBIDDEN unless a request for ``host`` may go to ``address``.

    The one rule for every resolved address, wherever it is checked: at registration and in
    the worker's resolver.
    """
    if not allow_private and not is_public(address):
        raise forbidden(host, address)


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
            raise unresolvable(host) from exc
        return []
    for address in addresses:
        check_address(host, address, allow_private=allow_private)
    host_header = parts.netloc.rpartition("@")[2]
    pinned = []
    for address in dict.fromkeys(addresses):  # getaddrinfo repeats an address per socket type
        literal = f"[{address}]" if address.version == 6 else str(address)
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        pinned.append(PinnedURL(url=url, host_header=host_header, sni_hostname=host))
    return pinned
