"""Reading the client's image: streamed uploads, `data:` URIs and http(s) URLs.

A URL is the client's, so anything can sit behind it. Each hop's host is resolved
once, every address it resolves to must be public, and the connection goes to the
address that was vetted (the Host header and TLS SNI still carry the name), so a DNS
answer that changes between the check and the connect cannot reach an internal service.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import unquote

import httpx

from server.config import Settings
from server.errors import InvalidInput, TooLarge

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
AddressGuard = Callable[[IPAddress], str | None]

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 5.0
USER_AGENT = "Loupe/0.1 (image fetch)"
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


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for the name `host`, in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canonical, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


async def fetch_image_url(
    url: str,
    *,
    settings: Settings,
    client: httpx.AsyncClient | None = None,
    resolve: Resolver = resolve_host,
    guard: AddressGuard | None = None,
) -> tuple[bytes, str | None]:
    """GET an http(s) image URL for a client: the body and its media type (e.g. "image/png", None if not sent).

    `guard` says why an address may not be contacted (None: it may); by default
    `classify_address`, or nothing when `settings.allow_private_urls`. Every failure
    is an InvalidInput on param "image": 413 past `settings.max_upload_bytes`, 400 otherwise.
    """
    fetch = _Fetch(resolve, guard or _settings_guard(settings), settings.max_upload_bytes,
                   httpx.Timeout(settings.url_timeout_s, connect=min(CONNECT_TIMEOUT_S, settings.url_timeout_s)))
    try:
        if client is not None:
            return await asyncio.wait_for(fetch.run(url, client), settings.url_timeout_s)
        async with httpx.AsyncClient(trust_env=False) as own:
            return await asyncio.wait_for(fetch.run(url, own), settings.url_timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise _unfetchable(f"no complete answer within {settings.url_timeout_s:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise _unfetchable(f"the connection failed ({type(error).__name__})") from None


def _allow_any(ip: IPAddress) -> None:
    return None


class _Fetch:
    def __init__(self, resolve: Resolver, guard: AddressGuard, max_bytes: int, timeout: httpx.Timeout) -> None:
        self.resolve = resolve
        self.guard = guard
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def run(self, url: str, client: httpx.AsyncClient) -> tuple[bytes, str | None]:
        current = parse_url(url, "image")
        for _ in range(MAX_REDIRECTS + 1):
            response = await self._open(current, client)
            try:
                if response.status_code in _REDIRECTS:
                    current = _redirect_target(current, response)
                    continue
                return await self._read(response)
            finally:
                await response.aclose()
        raise _unfetchable(f"more than {MAX_REDIRECTS} redirects")

    async def _open(self, url: httpx.URL, client: httpx.AsyncClient) -> httpx.Response:
        addresses = await _vetted(url, self.resolve, self.guard, "image")
        try:
            return await send_pinned(client, "GET", url, addresses, self.timeout, {"Accept": "image/*"},
                                     stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise _unfetchable(f"could not connect to {url.raw_host.decode('ascii')}") from error

    async def _read(self, response: httpx.Response) -> tuple[bytes, str | None]:
        if response.status_code >= 300:
            raise _unfetchable(f"HTTP {response.status_code}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise _too_large(self.max_bytes, "image")
        body = await read_capped(response.aiter_bytes(), self.max_bytes)
        if not body:
            raise _unfetchable("the response was empty")
        media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        return body, media_type or None


async def vetted_addresses(url: httpx.URL, settings: Settings, param: str,
                           resolve: Resolver = resolve_host) -> list[IPAddress]:
    """The addresses of `url`'s host, each one public (any, with `settings.allow_private_urls`); InvalidInput on
    `param` when the host can't be resolved or one of its addresses is not public."""
    return await _vetted(url, resolve, _settings_guard(settings), param)


def _settings_guard(settings: Settings) -> AddressGuard:
    """`classify_address`, or nothing when `settings.allow_private_urls`."""
    return _allow_any if settings.allow_private_urls else classify_address


async def _vetted(url: httpx.URL, resolve: Resolver, guard: AddressGuard, param: str) -> list[IPAddress]:
    host = url.raw_host.decode("ascii")
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = await resolve(host, url.port or (443 if url.scheme == "https" else 80))
        except (OSError, UnicodeError):
            addresses = []
    if not addresses:
        what = "fetch image URL" if param == "image" else f"reach {param}"
        raise InvalidInput(f"could not {what}: the host {host} could not be resolved", param)
    for address in addresses:
        reason = guard(address)
        if reason is not None:
            raise InvalidInput(f"{_noun(param)} host {host} resolves to a non-public address ({reason}); only "
                               "public addresses may be contacted", param)
    return addresses


async def send_pinned(client: httpx.AsyncClient, method: str, url: httpx.URL, addresses: list[IPAddress],
                      timeout: httpx.Timeout, headers: dict[str, str], content: bytes | None = None, *,
                      stream: bool = False) -> httpx.Response:
    """`method url` sent to the first of the vetted `addresses` that connects, never following a redirect."""
    failure: httpx.HTTPError | None = None
    for address in addresses:
        request = _pinned_request(method, url, address, timeout, headers, content)
        try:
            # auth=None: a shared client's credentials must never reach a client-chosen server.
            return await client.send(request, stream=stream, follow_redirects=False, auth=None)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            failure = error
    assert failure is not None
    raise failure


def parse_url(url: str, param: str) -> httpx.URL:
    """An absolute http(s) URL with a host; InvalidInput on `param` otherwise."""
    noun = _noun(param)
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise InvalidInput(f"{param} is not a valid URL", param) from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidInput(f"{noun} must use http or https, not {parsed.scheme}:" if parsed.scheme
                           else f"{noun} must be absolute: http(s)://host/path", param)
    if not parsed.raw_host:
        raise InvalidInput(f"{noun} has no host", param)
    return parsed


def _noun(param: str) -> str:
    """How messages name a URL field: "image URL" for `image` (which may also be a file), else the field."""
    return "image URL" if param == "image" else param


def _redirect_target(current: httpx.URL, response: httpx.Response) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise _unfetchable(f"HTTP {response.status_code} redirect without a Location")
    try:
        target = current.join(location)
    except (httpx.InvalidURL, ValueError):
        raise _unfetchable("redirected to an invalid URL") from None
    return parse_url(str(target), "image")


def _pinned_request(method: str, url: httpx.URL, address: IPAddress, timeout: httpx.Timeout,
                    headers: dict[str, str], content: bytes | None) -> httpx.Request:
    """A request for `url` that connects to `address`, while Host and SNI still name the URL's host."""
    host = url.raw_host.decode("ascii")
    extensions: dict[str, object] = {"timeout": timeout.as_dict()}
    if url.scheme == "https":
        extensions["sni_hostname"] = host
    headers = {
        "Host": url.netloc.decode("ascii"),
        "User-Agent": USER_AGENT,
        **headers,
        # A pooled connection was opened for one name's vetted address and TLS identity; never reuse it.
        "Connection": "close",
    }
    return httpx.Request(method, url.copy_with(host=str(address)), headers=headers, content=content,
                         extensions=extensions)


def decode_data_uri(uri: str, *, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URI; InvalidInput (malformed) or TooLarge (over `max_bytes`) on param "image"."""
    head, comma, payload = uri.partition(",")
    if not comma or head[:5].lower() != "data:":
        raise _refused("image data URI is malformed: expected data:<media type>;base64,<data>")
    if "base64" not in (part.strip().lower() for part in head[5:].split(";")[1:]):
        raise _refused("image data URI must be base64-encoded: data:<media type>;base64,<data>")
    return decode_base64(unquote(payload), max_bytes=max_bytes)


def decode_base64(payload: str, *, max_bytes: int) -> bytes:
    """Base64 as people write it: line breaks, the URL-safe alphabet and missing padding are tolerated."""
    text = "".join(payload.split()).rstrip("=").replace("-", "+").replace("_", "/")
    if not text:
        raise _refused("image data is empty")
    if len(text) * 3 // 4 > max_bytes:
        raise _too_large(max_bytes, "image")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _refused("image data is not valid base64") from None


async def read_capped(stream: AsyncIterator[bytes], max_bytes: int, *, param: str = "image") -> bytes:
    """Join a byte stream, stopping with TooLarge as soon as it passes `max_bytes`."""
    buffer = bytearray()
    async for chunk in stream:
        buffer += chunk
        if len(buffer) > max_bytes:
            raise _too_large(max_bytes, param)
    return bytes(buffer)


def _refused(message: str) -> InvalidInput:
    return InvalidInput(message, "image")


def _unfetchable(reason: str) -> InvalidInput:
    return _refused(f"could not fetch image URL: {reason}")


def _too_large(max_bytes: int, param: str) -> TooLarge:
    return TooLarge(f"{param} is larger than the limit of {max_bytes} bytes", param)
