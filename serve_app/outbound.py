"""Outbound HTTP to a URL a client gave (job callbacks; later image URLs to fetch): never
to an address inside the service's own network unless the operator allows it.

A client's URL must not make the service call loopback, the pod or node network, or the
cloud's metadata service (server-side request forgery). The host is resolved once, every
address it resolves to is checked, and the connection goes to the very address that was
checked (with the original Host header and TLS server name), so a DNS answer that changes
between the check and the connection (DNS rebinding) cannot redirect it. Numeric spellings
(`127.1`, `0x7f000001`, `2130706433`, `[::ffff:127.0.0.1]`) are read as the resolver reads
them, so they cannot hide an address either. http.client follows no redirects.

Standard library only: the ingress side imports it (no torch, no PIL).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the IP addresses (as text) it resolves to. Tests pass a stub.
Resolver = Callable[[str, int], list[str]]
# ((ip, port), timeout_s) -> a connected socket. Tests pass a stub.
Connector = Callable[[tuple[str, int], float], socket.socket]

# 100.64.0.0/10 (RFC 6598, carrier-grade NAT) holds Alibaba Cloud's metadata service,
# 100.100.100.200; Python counts it neither private nor global, so it is named here.
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# RFC 1918 and IPv6 unique-local (RFC 4193).
PRIVATE_NETWORKS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12",
                                                       "192.168.0.0/16", "fc00::/7")]


class BlockedDestination(Exception):
    """The URL may not be called; `reason` says why, in words a client can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def literal_address(host: str) -> IPAddress | None:
    """The address a numeric host stands for, as the C resolver reads it (inet_aton: `127.1`,
    `0x7f000001`, `2130706433`, octal parts); None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4, Teredo): a packet to it
    may end up at that IPv4 address."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def blocked_reason(address: IPAddress) -> str | None:
    """Why a connection to `address` is refused by default; None for a public address."""
    inner = _embedded_ipv4(address)
    if inner is not None:
        reason = blocked_reason(inner)
        return f"{reason} ({inner} in IPv6 form)" if reason else None
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_link_local:
        return "a link-local address (cloud metadata services live there)"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in SHARED_ADDRESS_SPACE:
        return "a carrier-grade NAT address (100.64.0.0/10: Alibaba Cloud's metadata " \
               "service 100.100.100.200 is there)"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local IPv6 address"
    if any(address in network for network in PRIVATE_NETWORKS):
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        # Documentation, benchmarking, protocol-assignment ranges (Python's registry).
        return "a special-purpose address (not globally routable)"
    return None


@dataclass(frozen=True)
class Destination:
    """A checked URL: connect to `address`, say `host` (Host header, TLS server name)."""

    scheme: str
    host: str
    port: int
    address: str
    target: str  # path and query


def check_url(url: str, *, allow_private: bool = False,
              resolver: Resolver = system_resolver) -> Destination:
    """Resolve the URL's host once and check every address it resolves to (a name with one
    public and one private address is refused: the connection could take either)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BlockedDestination("only http and https URLs can be called")
    host = parts.hostname
    if not host:
        raise BlockedDestination("the URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise BlockedDestination("the URL's port is not a number from 1 to 65535") from None
    literal = literal_address(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = [literal_address(a) or ipaddress.ip_address(a)
                         for a in resolver(host, port)]
        except (OSError, UnicodeError, ValueError):
            raise BlockedDestination(f"the host {host} does not resolve") from None
        if not addresses:
            raise BlockedDestination(f"the host {host} does not resolve")
    if not allow_private:
        for address in addresses:
            reason = blocked_reason(address)
            if reason is not None:
                shown = host if str(address) == host.strip("[]") else f"{host} ({address})"
                raise BlockedDestination(f"{shown} is {reason}; this service calls public "
                                         "addresses only")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Destination(scheme, host, port, str(addresses[0]), target)


def open_connection(dest: Destination, timeout_s: float,
                    connector: Connector | None = None) -> http.client.HTTPConnection:
    """An HTTP(S) connection to the checked address only. http.client opens it with
    `_create_connection`, which is replaced here: the name is never resolved again. TLS
    still verifies the certificate against the URL's host name."""
    conn: http.client.HTTPConnection
    if dest.scheme == "https":
        conn = http.client.HTTPSConnection(dest.host, dest.port, timeout=timeout_s)
    else:
        conn = http.client.HTTPConnection(dest.host, dest.port, timeout=timeout_s)
    connect = connector or (lambda address, timeout: socket.create_connection(address,
                                                                               timeout))
    pinned = (dest.address, dest.port)

    def create_connection(_address: tuple[str, int], timeout: float = timeout_s,
                          _source: object = None) -> socket.socket:
        return connect(pinned, timeout)
    conn._create_connection = create_connection  # type: ignore[attr-defined]
    return conn
