"""Outbound HTTP to a URL a client gave (job callbacks; image-to-image inputs by `imageUrl`):
never to an address inside the service's own network unless the operator allows it.

A client's URL must not make the service call loopback, the pod or node network, or the
cloud's metadata service (server-side request forgery). The host is resolved once, every
address it resolves to is checked, and the connection goes to the very address that was
checked (with the original Host header and TLS server name), so a DNS answer that changes
between the check and the connection (DNS rebinding) cannot redirect it. Numeric spellings
(`127.1`, `0x7f000001`, `2130706433`, `[::ffff:127.0.0.1]`) are read as the resolver reads
them, so they cannot hide an address either. http.client follows no redirects: `fetch`
follows a few itself, each target checked as the first URL was.

Standard library only: the ingress side imports it (no torch, no PIL).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

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
    """The URL may not be called; `reason` says why, in words a client can act on.
    `short_reason` says it without the address a name resolved to: an internal DNS name's
    internal address is not the client's to learn (image URLs answer with it)."""

    def __init__(self, reason: str, *, short_reason: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.short_reason = short_reason or reason


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


def host_allowed(host: str | None, allowed: list[str] | None) -> bool:
    """`allowed` None: any host. Otherwise exact names/IPs, or "*.example.com" for its
    subdomains (not example.com itself). Case-insensitive."""
    if allowed is None:
        return True
    if not host:
        return False
    host = host.lower().rstrip(".").strip("[]")
    for entry in allowed:
        entry = entry.lower().rstrip(".").strip("[]")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


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
                # Without the address a name resolved to: the IPv4 form's reason for it, not
                # "(10.0.0.1 in IPv6 form)". A numeric host is the client's own: said as is.
                short = (f"{host} is {reason}" if literal is not None else
                         f"{host} resolves to {blocked_reason(_embedded_ipv4(address) or address)}")
                raise BlockedDestination(
                    f"{shown} is {reason}; this service calls public addresses only",
                    short_reason=f"{short}; this service calls public addresses only")
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


REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_CHUNK_BYTES = 64 * 1024


class FetchFailed(Exception):
    """The URL was allowed but gave no usable body; `reason` says why, for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FetchTooLarge(FetchFailed):
    """The body is over the byte limit (declared, or counted while reading)."""


class FetchTimedOut(FetchFailed):
    """The whole fetch, redirects included, took longer than its time limit."""


def fetch(url: str, *, max_bytes: int, timeout_s: float, max_redirects: int,
          allow_private: bool = False, hosts: list[str] | None = None,
          resolver: Resolver = system_resolver, connector: Connector | None = None,
          accept: str = "*/*") -> bytes:
    """GET `url`'s body: at most `max_bytes` of it, within `timeout_s` in all, following at
    most `max_redirects` redirects. Every URL on the way, the first and each redirect's
    target, must be http(s), name a host `hosts` allows, and resolve to addresses the
    guard allows (check_url); the connection goes to the checked address.

    Raises BlockedDestination (a URL on the way may not be fetched), FetchTooLarge,
    FetchTimedOut or FetchFailed. Blocking: run it in a thread. A timer shuts the live
    socket at the deadline, so a server that sends a byte now and then (each read within
    the socket timeout) cannot hold the thread past it; only name resolution can (the
    system resolver's own timeouts bound it), so the async caller waits with a margin."""
    expired = threading.Event()
    live: list[http.client.HTTPConnection] = []

    def expire() -> None:
        expired.set()
        for conn in list(live):  # a copy: the fetching thread may change the list
            if conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
    deadline = time.monotonic() + timeout_s
    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        for hop in range(max_redirects + 1):
            dest = _check_hop(url, hop, allow_private, hosts, resolver)
            remaining = deadline - time.monotonic()
            if expired.is_set() or remaining <= 0:
                raise FetchTimedOut(f"no answer within {timeout_s:g} s")
            conn = open_connection(dest, remaining, connector)
            live.append(conn)
            try:
                location = _get(conn, dest, max_bytes, accept, expired)
            except (OSError, http.client.HTTPException) as exc:
                if expired.is_set() or isinstance(exc, TimeoutError):
                    raise FetchTimedOut(f"no answer within {timeout_s:g} s") from None
                raise FetchFailed(_failure(exc)) from None
            finally:
                conn.close()
                live.remove(conn)
            if isinstance(location, bytes):
                return location
            url = urljoin(url, location)
        raise BlockedDestination(f"it redirects more than {max_redirects} times (the most "
                                 "this service follows)")
    finally:
        timer.cancel()


def _check_hop(url: str, hop: int, allow_private: bool, hosts: list[str] | None,
               resolver: Resolver) -> Destination:
    """One URL of a fetch, the client's own (hop 0) or a redirect's target."""
    try:
        parts = urlsplit(url)
        # Before check_url resolves it: a host off the list is not even looked up. (The
        # scheme and a missing host are check_url's to refuse.)
        if (parts.scheme.lower() in ("http", "https") and parts.hostname
                and not host_allowed(parts.hostname, hosts)):
            raise BlockedDestination(
                f"the host {parts.hostname} is not one this service fetches from")
        return check_url(url, allow_private=allow_private, resolver=resolver)
    except ValueError:  # urlsplit: an unbalanced "[" in the host
        raise BlockedDestination("the URL is malformed") from None
    except BlockedDestination as err:
        if hop == 0:
            raise
        raise BlockedDestination(f"it redirects to a URL this service may not fetch: "
                                 f"{err.reason}",
                                 short_reason="it redirects to a URL this service may not "
                                              f"fetch: {err.short_reason}") from None


def _get(conn: http.client.HTTPConnection, dest: Destination, max_bytes: int, accept: str,
         expired: threading.Event) -> bytes | str:
    """One GET: the body (bytes), or a redirect's Location (str)."""
    # identity: a compressed body would be checked as compressed bytes, and its size
    # once inflated would not be the size counted here.
    conn.request("GET", dest.target, headers={"Accept": accept,
                                              "Accept-Encoding": "identity",
                                              "User-Agent": "sdxl-turbo-serve"})
    response = conn.getresponse()
    if response.status in REDIRECT_STATUSES:
        location = response.getheader("Location")
        if not location:
            raise FetchFailed(f"the server answered HTTP {response.status} without a Location")
        return location
    if response.status != 200:
        raise FetchFailed(f"the server answered HTTP {response.status}")
    # http.client reads no further than a Content-Length (a longer body is cut there), and
    # a chunked body ignores it: the count below is what holds in every case.
    declared = response.length
    if declared is not None and declared > max_bytes:
        raise FetchTooLarge(f"the body is {declared} bytes, over {max_bytes}")
    body = bytearray()
    while True:
        # read1: one read from the socket at most, so the deadline is looked at between
        # reads however slowly the bytes come.
        chunk = response.read1(READ_CHUNK_BYTES)
        if expired.is_set():
            raise TimeoutError
        if not chunk:
            break
        body += chunk
        if len(body) > max_bytes:
            raise FetchTooLarge(f"the body is over {max_bytes} bytes")
    if declared is not None and len(body) < declared:
        raise FetchFailed(f"the body ended after {len(body)} of its {declared} bytes")
    return bytes(body)


def _failure(exc: BaseException) -> str:
    """What went wrong on the way, in words for the client (no addresses, no traceback)."""
    if isinstance(exc, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "the server's TLS certificate did not verify"
    if isinstance(exc, ssl.SSLError):
        return "the TLS handshake failed"
    if isinstance(exc, http.client.HTTPException):
        return f"the server's answer was not valid HTTP ({type(exc).__name__})"
    return f"the connection failed ({type(exc).__name__})"
