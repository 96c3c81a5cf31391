"""Reading the client's image: streamed uploads, `data:` URIs and http(s) URLs.

A URL is the client's, so anything can sit behind it: it is fetched under the outbound policy
(`server/outbound.py`: every hop's addresses vetted, the connection pinned to them, redirects re-vetted,
the body capped, a deadline), and whatever goes wrong is the client's 400 (413 past the size cap).
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from urllib.parse import unquote

import httpx

from server import outbound
from server.config import Settings
from server.errors import InvalidInput, TooLarge
from server.outbound import AddressGuard, Outbound, Resolver, resolve_host


async def fetch_image_url(
    url: str,
    *,
    settings: Settings,
    client: httpx.AsyncClient | None = None,
    resolve: Resolver = resolve_host,
    guard: AddressGuard | None = None,
) -> tuple[bytes, str | None]:
    """GET an http(s) image URL for a client: the body and its media type (e.g. "image/png", None if not sent).

    `guard` says why an address may not be contacted (None: it may); by default the settings' policy. Every
    failure is an InvalidInput on param "image": 413 past `settings.max_upload_bytes`, 400 otherwise.
    """
    policy = Outbound.of(settings, trust_providers=False, resolve=resolve, guard=guard)
    try:
        return await policy.fetch(url, noun="image URL", max_bytes=settings.max_upload_bytes,
                                  timeout_s=settings.url_timeout_s, client=client, headers={"Accept": "image/*"})
    except outbound.Oversized as failure:
        raise TooLarge(failure.message, "image") from None
    except outbound.Blocked as failure:
        raise InvalidInput(failure.message, "image") from None
    except outbound.OutboundFailure as failure:
        raise _refused(f"could not fetch image URL: {failure.message}") from None


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
        raise TooLarge(f"image is larger than the limit of {max_bytes} bytes", "image")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _refused("image data is not valid base64") from None


async def read_capped(stream: AsyncIterator[bytes], max_bytes: int, *, param: str = "image") -> bytes:
    """Join a byte stream, stopping with TooLarge as soon as it passes `max_bytes`."""
    try:
        return await outbound.read_capped(stream, max_bytes, param)
    except outbound.Oversized as failure:
        raise TooLarge(failure.message, param) from None


def _refused(message: str) -> InvalidInput:
    return InvalidInput(message, "image")
