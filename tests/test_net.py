"""Fetching client-supplied images: the SSRF guard, pinned connections, size caps, timeouts, data: URIs.

Every server here listens on 127.0.0.1; tests that need a "public" host give fetch_image_url
a resolver that maps a made-up name to 127.0.0.1 and a guard that lets only that address through.
"""
from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import trustme

from server.config import Settings
from server.api.errors import retryable, status_of
from server.errors import LoupeError
from server.net import decode_data_uri, fetch_image_url, read_capped
from server.outbound import IPAddress, classify_address, resolve_host
from tests.servers import free_port, serve

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
LOOPBACK = ipaddress.ip_address("127.0.0.1")


# --- the address classifier ---------------------------------------------------------------

@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("fd12:3456::1", "private"),
    ("fec0::1", "private"),
    ("100.64.0.1", "shared"),
    ("100.127.255.255", "shared"),
    ("169.254.169.254", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("0.1.2.3", "reserved"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("198.18.0.1", "reserved"),
    ("192.0.0.8", "reserved"),
    ("192.0.2.10", "documentation"),
    ("2001:db8::1", "documentation"),
    ("2001::1", "reserved"),  # Teredo
    ("100::1", "reserved"),
    ("::7f00:1", "reserved"),  # IPv4-compatible form of 127.0.0.1
    ("4000::1", "reserved"),  # outside global unicast
    # IPv6 spellings of IPv4 addresses are judged by the IPv4 address they reach.
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.1.2.3", "private"),
    ("::ffff:169.254.169.254", "metadata"),
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ("64:ff9b::7f00:1", "loopback"),
    ("64:ff9b:1::1", "private"),  # local-use NAT64
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:c0a8:101::1", "private"),  # 6to4 of 192.168.1.1
    ("2002:a9fe:a9fe::", "metadata"),  # 6to4 of 169.254.169.254
])
def test_non_public_addresses_are_named(address: str, reason: str) -> None:
    assert classify_address(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "172.15.255.255", "172.32.0.0", "100.63.255.255", "100.128.0.0",
    "169.253.255.255", "2606:4700:4700::1111", "2a00:1450:4001::200e",
    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
])
def test_public_addresses_pass(address: str) -> None:
    assert classify_address(ipaddress.ip_address(address)) is None


def test_resolve_host_uses_the_system_resolver() -> None:
    assert all(address.is_loopback for address in asyncio.run(resolve_host("localhost", 80)))


# --- fake image servers -------------------------------------------------------------------

class ImageHost:
    """An ASGI app with the behaviours an image URL can have; remembers the paths it was asked for."""

    def __init__(self) -> None:
        self.hits: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            for phase in ("startup", "shutdown"):
                await receive()
                await send({"type": f"lifespan.{phase}.complete"})
            return
        await receive()  # the (empty) request body
        path = scope["path"]
        query = {key: values[0] for key, values in parse_qs(scope["query_string"].decode()).items()}
        self.hits.append(path)
        headers = {key.decode(): value.decode() for key, value in scope["headers"]}
        if path == "/image.png":
            await _respond(send, 200, IMAGE, [(b"content-type", b"image/png; charset=binary")])
        elif path == "/headers":
            await _respond(send, 200, json.dumps(headers).encode(), [(b"content-type", b"application/json")])
        elif path == "/redirect":
            await _respond(send, int(query.get("status", "302")), b"", [(b"location", query["to"].encode())])
        elif path == "/chain":
            left = int(query["n"])
            location = f"/chain?n={left - 1}".encode() if left else b"image.png"
            await _respond(send, 307, b"", [(b"location", location)])
        elif path.startswith("/status/"):
            await _respond(send, int(path.rsplit("/", 1)[1]), b"nope", [])
        elif path == "/empty":
            await _respond(send, 200, b"", [(b"content-type", b"image/png")])
        elif path == "/endless":
            await _send_forever(receive, send)
        elif path == "/declared-huge":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(10**10).encode())]})
            await _until_disconnect(receive)
        elif path == "/stall-body":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"image/png")]})
            await send({"type": "http.response.body", "body": IMAGE[:100], "more_body": True})
            await _until_disconnect(receive)
        elif path == "/hang":
            await _until_disconnect(receive)
        else:
            await _respond(send, 404, b"", [])


async def _respond(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_forever(receive: Any, send: Any) -> None:
    gone = asyncio.ensure_future(_until_disconnect(receive))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"image/png")]})
    chunk = b"\0" * 16384
    while not gone.done():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await asyncio.sleep(0)


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[ImageHost, str]]:
    app = ImageHost()
    with serve(app) as base:
        yield app, base


def _settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"allow_private_urls": True, "url_timeout_s": 5.0, "max_upload_bytes": 1 << 20}
    return Settings(**(values | overrides))


def _only_loopback_127_0_0_1(ip: IPAddress) -> str | None:
    """A guard that treats the test server's address as public and judges everything else for real."""
    return None if ip == LOOPBACK else classify_address(ip)


def _fake_dns(table: dict[str, list[str]]) -> Any:
    async def resolve(name: str, port: int) -> list[IPAddress]:
        if name not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(address) for address in table[name]]
    return resolve


def _fetch(url: str, settings: Settings, **kwargs: Any) -> tuple[bytes, str | None]:
    return asyncio.run(fetch_image_url(url, settings=settings, **kwargs))


def _fetch_error(url: str, settings: Settings, **kwargs: Any) -> LoupeError:
    with pytest.raises(LoupeError) as caught:
        _fetch(url, settings, **kwargs)
    assert caught.value.param == "image"
    assert retryable(caught.value) is False
    return caught.value


# --- fetching -----------------------------------------------------------------------------

def test_fetches_image_and_media_type(host: tuple[ImageHost, str]) -> None:
    _, base = host
    assert _fetch(f"{base}/image.png", _settings()) == (IMAGE, "image/png")


def test_loopback_is_refused_before_any_request(host: tuple[ImageHost, str]) -> None:
    app, base = host
    before = len(app.hits)
    for url in (f"{base}/image.png", base.replace("127.0.0.1", "localhost") + "/image.png",
                f"http://[::ffff:127.0.0.1]:{base.rsplit(':', 1)[1]}/image.png"):
        error = _fetch_error(url, _settings(allow_private_urls=False))
        assert status_of(error) == 400
        assert "non-public address (loopback)" in error.message
    assert len(app.hits) == before


def test_name_resolving_to_any_private_address_is_refused(host: tuple[ImageHost, str]) -> None:
    app, base = host
    port = base.rsplit(":", 1)[1]
    before = len(app.hits)
    resolve = _fake_dns({"cdn.test": ["127.0.0.1", "10.0.0.7"]})
    error = _fetch_error(f"http://cdn.test:{port}/image.png", _settings(), resolve=resolve,
                         guard=_only_loopback_127_0_0_1)
    assert "(private)" in error.message
    assert len(app.hits) == before


def test_connects_to_the_vetted_address_and_keeps_the_host_name(host: tuple[ImageHost, str]) -> None:
    _, base = host
    port = base.rsplit(":", 1)[1]
    body, _ = _fetch(f"http://images.test:{port}/headers", _settings(allow_private_urls=False),
                     resolve=_fake_dns({"images.test": ["127.0.0.1"]}), guard=_only_loopback_127_0_0_1)
    assert json.loads(body)["host"] == f"images.test:{port}"


def test_shared_client_credentials_are_not_sent(host: tuple[ImageHost, str]) -> None:
    _, base = host

    async def run() -> bytes:
        async with httpx.AsyncClient(auth=("gateway", "secret"), headers={"X-Api-Key": "secret"}) as client:
            body, _ = await fetch_image_url(f"{base}/headers", settings=_settings(), client=client)
            return body

    headers = json.loads(asyncio.run(run()))
    assert "authorization" not in headers
    assert "x-api-key" not in headers


def test_redirect_to_a_private_address_is_refused_at_the_hop(host: tuple[ImageHost, str]) -> None:
    app, base = host
    port = base.rsplit(":", 1)[1]
    before = app.hits.count("/image.png")
    names = _fake_dns({"public.test": ["127.0.0.1"], "internal.test": ["127.0.0.3"]})
    for target in (f"http://127.0.0.2:{port}/image.png", f"http://[::1]:{port}/image.png",
                   f"http://internal.test:{port}/image.png"):
        error = _fetch_error(f"http://public.test:{port}/redirect?to={target}", _settings(allow_private_urls=False),
                             resolve=names, guard=_only_loopback_127_0_0_1)
        assert "non-public address" in error.message
    assert app.hits.count("/image.png") == before
    assert app.hits.count("/redirect") >= 3


def test_redirect_to_another_scheme_is_refused(host: tuple[ImageHost, str]) -> None:
    _, base = host
    error = _fetch_error(f"{base}/redirect?to=file:///etc/passwd", _settings())
    assert "http or https" in error.message


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_followed(host: tuple[ImageHost, str], status: int) -> None:
    _, base = host
    assert _fetch(f"{base}/redirect?status={status}&to=/image.png", _settings())[0] == IMAGE


def test_at_most_five_redirects(host: tuple[ImageHost, str]) -> None:
    _, base = host
    assert _fetch(f"{base}/chain?n=4", _settings())[0] == IMAGE  # 5 redirects
    error = _fetch_error(f"{base}/chain?n=5", _settings())
    assert error.message == "could not fetch image URL: more than 5 redirects"


@pytest.mark.parametrize("status", [403, 404, 500, 503])
def test_upstream_errors_are_the_clients_problem(host: tuple[ImageHost, str], status: int) -> None:
    _, base = host
    error = _fetch_error(f"{base}/status/{status}", _settings())
    assert (status_of(error), error.message) == (400, f"could not fetch image URL: HTTP {status}")


def test_empty_response_is_refused(host: tuple[ImageHost, str]) -> None:
    _, base = host
    assert "empty" in _fetch_error(f"{base}/empty", _settings()).message


def test_endless_body_is_cut_at_the_cap(host: tuple[ImageHost, str]) -> None:
    _, base = host
    # The deadline is far off: a 413 (not a 400 "no complete answer") says the cap, not the clock, ended it.
    error = _fetch_error(f"{base}/endless", _settings(max_upload_bytes=256 * 1024, url_timeout_s=120.0))
    assert status_of(error) == 413
    assert error.code == "PAYLOAD_TOO_LARGE"


def test_honest_content_length_is_refused_before_reading(host: tuple[ImageHost, str]) -> None:
    _, base = host
    # The body never comes: waiting for it would end at the deadline in a 400, never in a 413.
    error = _fetch_error(f"{base}/declared-huge", _settings(url_timeout_s=120.0))
    assert status_of(error) == 413
    assert error.code == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize("path", ["/hang", "/stall-body"])
def test_a_server_that_hangs_times_out(host: tuple[ImageHost, str], path: str) -> None:
    _, base = host
    started = time.monotonic()
    error = _fetch_error(f"{base}{path}", _settings(url_timeout_s=0.5))
    assert status_of(error) == 400
    assert error.message == "could not fetch image URL: no complete answer within 0.5 s"
    assert time.monotonic() - started < 60  # the hang is endless: any finite bound tells the deadline from a hang


def test_unreachable_and_unknown_hosts_are_400s() -> None:
    closed = _fetch_error(f"http://127.0.0.1:{free_port()}/image.png", _settings())
    assert status_of(closed) == 400
    assert closed.message == "could not fetch image URL: could not connect to 127.0.0.1"
    unknown = _fetch_error("http://nowhere.test/image.png", _settings(), resolve=_fake_dns({}))
    assert unknown.message == "could not fetch image URL: the host nowhere.test could not be resolved"


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://127.0.0.1/image.png", "gopher://127.0.0.1:70/_GET", "data:image/png;base64,AAAA",
    "javascript:alert(1)", "/image.png", "http://", "http://[::1/x",
])
def test_only_http_urls_are_fetched(url: str) -> None:
    error = _fetch_error(url, _settings())
    assert status_of(error) == 400


# --- TLS: certificate checked against the name while connecting to the vetted address ---------

@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ssl.SSLContext]]:
    ca = trustme.CA()
    cert = ca.issue_cert("images.test")
    folder: Path = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with serve(ImageHost(), ssl_certfile=str(cert_file), ssl_keyfile=str(key_file)) as base:
        yield base.rsplit(":", 1)[1], context


def _fetch_tls(url: str, context: ssl.SSLContext, names: dict[str, list[str]]) -> tuple[bytes, str | None]:
    async def run() -> tuple[bytes, str | None]:
        async with httpx.AsyncClient(verify=context) as client:
            return await fetch_image_url(url, settings=_settings(allow_private_urls=False), client=client,
                                         resolve=_fake_dns(names), guard=_only_loopback_127_0_0_1)
    return asyncio.run(run())


def test_tls_uses_the_host_name_for_sni_and_verification(tls: tuple[str, ssl.SSLContext]) -> None:
    port, context = tls
    body, _ = _fetch_tls(f"https://images.test:{port}/headers", context, {"images.test": ["127.0.0.1"]})
    assert json.loads(body)["host"] == f"images.test:{port}"


def test_tls_certificate_for_another_name_is_refused(tls: tuple[str, ssl.SSLContext]) -> None:
    port, context = tls
    with pytest.raises(LoupeError) as caught:
        _fetch_tls(f"https://evil.test:{port}/image.png", context, {"evil.test": ["127.0.0.1"]})
    assert caught.value.message == "could not fetch image URL: could not connect to evil.test"


# --- data: URIs ---------------------------------------------------------------------------

def _data_uri(data: bytes, header: str = "data:image/png;base64") -> str:
    return f"{header},{base64.b64encode(data).decode()}"


def test_data_uri_decodes() -> None:
    assert decode_data_uri(_data_uri(IMAGE), max_bytes=len(IMAGE)) == IMAGE
    assert decode_data_uri(_data_uri(IMAGE, "DATA:image/png;charset=x;BASE64"), max_bytes=10**6) == IMAGE


def test_data_uri_tolerates_line_breaks_urlsafe_alphabet_and_missing_padding() -> None:
    encoded = base64.urlsafe_b64encode(IMAGE[:1000]).decode().rstrip("=")
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    assert decode_data_uri(f"data:image/png;base64,{wrapped}", max_bytes=10**6) == IMAGE[:1000]
    assert decode_data_uri("data:image/png;base64,AQID%3D", max_bytes=10) == b"\x01\x02\x03"


@pytest.mark.parametrize(("uri", "words"), [
    ("data:image/png;base64", "malformed"),
    ("image/png;base64,AAAA", "malformed"),
    ("data:image/png,%89PNG", "base64-encoded"),
    ("data:image/png;base64,", "empty"),
    ("data:image/png;base64,!!!!", "not valid base64"),
    ("data:image/png;base64,AAAAA", "not valid base64"),
])
def test_bad_data_uris_are_400s(uri: str, words: str) -> None:
    with pytest.raises(LoupeError) as caught:
        decode_data_uri(uri, max_bytes=1000)
    assert (status_of(caught.value), caught.value.param) == (400, "image")
    assert words in caught.value.message


def test_data_uri_over_the_cap_is_413() -> None:
    assert decode_data_uri(_data_uri(b"x" * 100), max_bytes=100) == b"x" * 100
    with pytest.raises(LoupeError) as caught:
        decode_data_uri(_data_uri(b"x" * 101), max_bytes=100)
    assert (status_of(caught.value), caught.value.param) == (413, "image")


# --- read_capped ----------------------------------------------------------------------------

def test_read_capped_joins_up_to_the_limit() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for piece in (b"ab", b"", b"cde"):
            yield piece

    assert asyncio.run(read_capped(chunks(), 5)) == b"abcde"


def test_read_capped_stops_pulling_once_over() -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 1000

    with pytest.raises(LoupeError) as caught:
        asyncio.run(read_capped(endless(), 2500, param="mask"))
    assert (status_of(caught.value), caught.value.param) == (413, "mask")
    assert pulled == 3
