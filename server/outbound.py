"""Every HTTP request Loupe makes, under one policy: which addresses it may reach, redirects, size caps, timeouts.

Loupe calls URLs a client chose (image URLs, webhook URLs), the providers the operator configured (fal.ai, a
gateway), URLs those providers hand back (result images, fal's signed upload URL) and weight downloads:

- An origin the operator configured (LOUPE_FAL_URL, LOUPE_FAL_STORAGE_URL, LOUPE_GATEWAY_URL, a weights mirror)
  is reached by its name, wherever it is, by the calls made for it: the operator chose it. A URL a client chose
  (an image URL, a webhook URL) gets no such exemption.
- Any other host is resolved once and every address it resolves to must be public (any address with
  LOUPE_ALLOW_PRIVATE_URLS). The connection goes to the vetted address while the Host header and TLS SNI carry
  the name, so a DNS answer that changes between the check and the connect can't reach an internal service.
- A redirect is followed only where the caller allows it, each hop vetted again; credentials go only to the
  origin they belong to, never to a hop elsewhere.
- A body is read under a size cap (its declared length first); every hop has timeouts, every call a deadline.

Failures are `OutboundFailure`s with messages a client may read; each caller turns them into its own errors.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from server.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
AddressGuard = Callable[[IPAddress], str | None]
Origin = tuple[str, str, int]

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 5.0
USER_AGENT = "Loupe/0.1"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

# First match wins: the specific entries sit before the ranges that contain them.
_V4_RULES = tuple(
    (ipaddress.IPv4Network(network), reason)
    for network, reason in (
        ("169.254.169.254/32", "metadata"),  # AWS, GCP, Azure, OpenStack instance metadata
        ("100.100.100.200/32", "metadata"),  # Alibaba Cloud
        ("192.0.0.192/32", "metadata"),  # Oracle Cloud Classic
        ("0.0.0.0/32", "unspecified"),
        ("0.0.0.0/8", "reserved"),  # "this network"
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared"),  # carrier-grade NAT
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "reserved"),  # former 6to4 relay anycast
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),  # benchmarking
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_V6_RULES = tuple(
    (ipaddress.IPv6Network(network), reason)
    for network, reason in (
        ("fd00:ec2::254/128", "metadata"),  # AWS instance metadata over IPv6
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "reserved"),  # deprecated IPv4-compatible addresses
        ("64:ff9b:1::/48", "private"),  # local-use NAT64
        ("100::/64", "reserved"),  # discard-only
        ("2001:db8::/32", "documentation"),
        ("2001::/23", "reserved"),  # IETF protocol assignments: Teredo, ORCHID, benchmarking
        ("3fff::/20", "documentation"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "private"),  # deprecated site-local
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


class OutboundFailure(Exception):
    """A call out that could not be made or completed; the message says why, in words a client may read."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Blocked(OutboundFailure):
    """The policy refused the URL or one of its addresses: nothing was sent there."""


class Unreachable(OutboundFailure):
    """The host could not be resolved or connected to, or the connection failed."""


class TimedOut(OutboundFailure):
    pass


class Oversized(OutboundFailure):
    def __init__(self, message: str, max_bytes: int) -> None:
        super().__init__(message)
        self.max_bytes = max_bytes


class BadAnswer(OutboundFailure):
    """An answer that can't be used: an error status, an empty body, a broken or endless chain of redirects."""


def classify_address(ip: IPAddress) -> str | None:
    """None when `ip` is a public address; otherwise why it is not ("loopback", "private", "metadata", ...)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return classify_address(embedded)
    rules = _V4_RULES if isinstance(ip, ipaddress.IPv4Address) else _V6_RULES
    for network, reason in rules:
        if ip in network:
            return reason
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST:
        return "reserved"
    # Backstop for ranges registered after this table was written.
    return None if ip.is_global else "reserved"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a packet to `ip` really reaches: IPv4-mapped, NAT64 and 6to4 forms."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def allow_any(ip: IPAddress) -> None:
    return None


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for the name `host`, in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canonical, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def origin_of(url: httpx.URL | str) -> Origin:
    url = httpx.URL(url) if isinstance(url, str) else url
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.scheme, url.raw_host.decode("ascii").lower(), port


def parse_url(url: str, noun: str) -> httpx.URL:
    """An absolute http(s) URL with a host; Blocked otherwise."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise Blocked(f"{noun} is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise Blocked(f"{noun} must use http or https, not {parsed.scheme}:" if parsed.scheme
                      else f"{noun} must be absolute: http(s)://host/path")
    if not parsed.raw_host:
        raise Blocked(f"{noun} has no host")
    return parsed


@dataclass(frozen=True)
class Credentials:
    """Headers (an Authorization, say) that may go only to their own origin."""

    headers: dict[str, str]
    origin: Origin


@dataclass(frozen=True)
class Outbound:
    guard: AddressGuard = classify_address
    trusted: frozenset[Origin] = frozenset()  # the configured providers' origins, reached by name
    resolve: Resolver = resolve_host

    @classmethod
    def of(cls, settings: Settings, *, trust_providers: bool, resolve: Resolver = resolve_host,
           guard: AddressGuard | None = None) -> Outbound:
        """The policy the settings make: private addresses only with LOUPE_ALLOW_PRIVATE_URLS; with
        `trust_providers` (the providers' own calls, not a URL a client chose), the providers' origins trusted."""
        configured = (settings.fal_url, settings.fal_storage_url) if settings.fal_key else ()
        configured += (settings.gateway_url,) if settings.gateway_url else ()
        trusted = frozenset(origin_of(url) for url in configured) if trust_providers else frozenset()
        return cls(guard or (allow_any if settings.allow_private_urls else classify_address), trusted, resolve)

    def trusts(self, url: httpx.URL) -> bool:
        return origin_of(url) in self.trusted

    async def vet(self, url: httpx.URL, noun: str) -> list[IPAddress] | None:
        """The addresses a call to `url` may connect to, each vetted; None for a trusted origin (reached by name)."""
        if self.trusts(url):
            return None
        host = url.raw_host.decode("ascii")
        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                addresses = await self.resolve(host, url.port or (443 if url.scheme == "https" else 80))
            except (OSError, UnicodeError):
                addresses = []
        if not addresses:
            raise Unreachable(f"the host {host} could not be resolved")
        for address in addresses:
            reason = self.guard(address)
            if reason is not None:
                raise Blocked(f"{noun} host {host} resolves to a non-public address ({reason}); only public "
                              "addresses may be contacted")
        return addresses

    async def send(self, client: httpx.AsyncClient, method: str, url: str | httpx.URL, *, noun: str,
                   timeout: httpx.Timeout, headers: dict[str, str] | None = None,
                   credentials: Credentials | None = None, redirects: int = 0, stream: bool = False,
                   **body: Any) -> httpx.Response:
        """`method url` with `body` (content, json, data, files, params, as httpx takes them), each hop vetted. Up
        to `redirects` redirects are followed (a 303 as a GET), past that a BadAnswer; with none allowed, a
        redirect is the answer. The caller closes a streamed response."""
        current = parse_url(str(url), noun)
        for hop in range(redirects + 1):
            hop_headers = dict(headers or {})
            if credentials is not None and origin_of(current) == credentials.origin:
                hop_headers.update(credentials.headers)
            response = await self._send_once(client, method, current, noun, timeout, hop_headers, body, stream)
            if response.status_code not in _REDIRECTS or redirects == 0:
                return response
            await response.aclose()
            if hop == redirects:
                break
            current = _redirect_target(current, response, noun)
            if response.status_code == 303 and method != "GET":
                method, body = "GET", {}
        raise BadAnswer(f"more than {redirects} redirects")

    async def _send_once(self, client: httpx.AsyncClient, method: str, url: httpx.URL, noun: str,
                         timeout: httpx.Timeout, headers: dict[str, str], body: dict[str, Any],
                         stream: bool) -> httpx.Response:
        addresses = await self.vet(url, noun)
        headers = {"User-Agent": USER_AGENT, **headers}
        try:
            if addresses is None:
                request = client.build_request(method, url, headers=headers, timeout=timeout, **body)
                return await client.send(request, stream=stream, follow_redirects=False)
            return await _send_pinned(client, method, url, addresses, timeout, headers, body, stream)
        except httpx.TimeoutException as error:
            raise TimedOut(f"{url.raw_host.decode('ascii')} did not answer in time") from error
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise Unreachable(f"could not connect to {url.raw_host.decode('ascii')}") from error
        except httpx.HTTPError as error:
            raise Unreachable(f"the connection to {url.raw_host.decode('ascii')} failed ({type(error).__name__})") \
                from error

    async def fetch(self, url: str, *, noun: str, max_bytes: int, timeout_s: float,
                    client: httpx.AsyncClient | None = None, headers: dict[str, str] | None = None,
                    credentials: Credentials | None = None) -> tuple[bytes, str | None]:
        """GET `url` and read its body under `max_bytes` within `timeout_s` in all, following up to five redirects:
        (the body, its media type or None)."""
        async def get(http: httpx.AsyncClient) -> tuple[bytes, str | None]:
            response = await self.send(http, "GET", url, noun=noun, timeout=hop_timeout(timeout_s), headers=headers,
                                       credentials=credentials, redirects=MAX_REDIRECTS, stream=True)
            try:
                if response.status_code >= 300:
                    raise BadAnswer(f"HTTP {response.status_code}")
                body = await read_body(response, max_bytes, noun)
            finally:
                await response.aclose()
            if not body:
                raise BadAnswer("the response was empty")
            media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            return body, media_type or None

        try:
            if client is not None:
                return await asyncio.wait_for(get(client), timeout_s)
            async with httpx.AsyncClient(trust_env=False) as own:
                return await asyncio.wait_for(get(own), timeout_s)
        except (asyncio.TimeoutError, TimedOut):
            raise TimedOut(f"no complete answer within {timeout_s:g} s") from None


def hop_timeout(timeout_s: float) -> httpx.Timeout:
    return httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))


async def read_body(response: httpx.Response, max_bytes: int, noun: str) -> bytes:
    """A streamed response's body, refused from its declared length, else cut as it passes `max_bytes`."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise Oversized(f"{noun} is larger than the limit of {max_bytes} bytes", max_bytes)
    try:
        return await read_capped(response.aiter_bytes(), max_bytes, noun)
    except httpx.TimeoutException as error:
        raise TimedOut("the answer stalled") from error
    except httpx.HTTPError as error:
        raise Unreachable(f"the connection failed ({type(error).__name__})") from error


async def read_capped(stream: AsyncIterator[bytes], max_bytes: int, noun: str) -> bytes:
    """Join a byte stream, stopping with Oversized as soon as it passes `max_bytes`."""
    buffer = bytearray()
    async for chunk in stream:
        buffer += chunk
        if len(buffer) > max_bytes:
            raise Oversized(f"{noun} is larger than the limit of {max_bytes} bytes", max_bytes)
    return bytes(buffer)


def _redirect_target(current: httpx.URL, response: httpx.Response, noun: str) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise BadAnswer(f"HTTP {response.status_code} redirect without a Location")
    try:
        target = current.join(location)
    except (httpx.InvalidURL, ValueError):
        raise BadAnswer("redirected to an invalid URL") from None
    return parse_url(str(target), noun)


async def _send_pinned(client: httpx.AsyncClient, method: str, url: httpx.URL, addresses: Iterable[IPAddress],
                       timeout: httpx.Timeout, headers: dict[str, str], body: dict[str, Any],
                       stream: bool) -> httpx.Response:
    """`method url` sent to the first of the vetted `addresses` that connects, never following a redirect."""
    failure: httpx.HTTPError | None = None
    for address in addresses:
        request = _pinned_request(method, url, address, timeout, headers, body)
        try:
            # auth=None: a shared client's credentials must never reach a client-chosen server.
            return await client.send(request, stream=stream, follow_redirects=False, auth=None)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            failure = error
    assert failure is not None
    raise failure


def _pinned_request(method: str, url: httpx.URL, address: IPAddress, timeout: httpx.Timeout,
                    headers: dict[str, str], body: dict[str, Any]) -> httpx.Request:
    """A request for `url` that connects to `address`, while Host and SNI still name the URL's host."""
    host = url.raw_host.decode("ascii")
    extensions: dict[str, object] = {"timeout": timeout.as_dict()}
    if url.scheme == "https":
        extensions["sni_hostname"] = host
    headers = {
        "Host": url.netloc.decode("ascii"),
        **headers,
        # A pooled connection was opened for one name's vetted address and TLS identity; never reuse it.
        "Connection": "close",
    }
    return httpx.Request(method, url.copy_with(host=str(address)), headers=headers, extensions=extensions, **body)
