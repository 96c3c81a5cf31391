"""What every remote provider shares: the result types, the Provider protocol and careful HTTP helpers.

The helpers keep upstream credentials out of everything a client or a log line
sees, fetch result images under a size cap, and run the n calls of an emulated
`n` together so that one failure cancels the others.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx

from server.catalog import ModelEntry
from server.errors import ApiError
from server.jobs import Job

T = TypeVar("T")

# Per-request limits for every upstream call; the whole job is bounded by LOUPE_REMOTE_TIMEOUT_S.
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


@dataclass(frozen=True)
class RemoteImage:
    data: bytes
    content_type: str | None


@dataclass(frozen=True)
class RemoteResult:
    images: list[RemoteImage]
    provider: str  # "fal" | "gateway"
    provider_name: str  # "fal.ai" | "gateway"
    executed_model: str  # e.g. "fal/fal-ai/topaz/upscale/image", or what the gateway reported
    cost: float | None  # USD for all n images; None when unknown


class Provider(Protocol):
    name: str
    display_name: str

    def serves(self, entry: ModelEntry | None, model_id: str) -> bool: ...

    def available(self) -> bool:
        """False while the provider's circuit breaker refuses calls."""
        ...

    async def upscale(self, job: Job) -> RemoteResult: ...

    async def dry_run(self, job: Job) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class Redactor:
    """Removes upstream credentials from any text before it reaches a client or a log."""

    def __init__(self, *secrets: str | None) -> None:
        parts: set[str] = set()
        for secret in secrets:
            if secret:
                parts.add(secret)
                # fal's split credentials are `key_id:key_secret`; either half alone is still sensitive.
                parts.update(half for half in secret.split(":") if len(half) >= 8)
        self._parts = sorted(parts, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for part in self._parts:
            text = text.replace(part, "[redacted]")
        return text


def same_origin(url: str, base: str) -> bool:
    """Whether `url` is on the scheme, host and port of `base`: only there may a provider's key be sent."""
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def decode_base64(payload: str, max_bytes: int) -> bytes:
    if len(payload) * 3 // 4 > max_bytes:
        raise ApiError(502, f"the provider returned an image over {max_bytes} bytes", retryable=False)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(502, "the provider returned an image whose base64 does not decode") from None


def decode_data_uri(uri: str, max_bytes: int) -> RemoteImage:
    header, comma, payload = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(502, "the provider returned an image as a data: URI that is not base64")
    media_type = header[len("data:"):-len(";base64")].split(";")[0]
    return RemoteImage(decode_base64(payload, max_bytes), media_type or None)


async def download(
    http: httpx.AsyncClient, url: str, *, max_bytes: int, redact: Redactor, headers: dict[str, str] | None = None
) -> RemoteImage:
    """A result image named by the provider: a data: URI, or an http(s) URL streamed under `max_bytes`."""
    if url.startswith("data:"):
        return decode_data_uri(url, max_bytes)
    if urlsplit(url).scheme not in ("http", "https"):
        raise ApiError(502, "the provider returned an image link Loupe can't fetch")
    try:
        async with http.stream("GET", url, headers=headers, follow_redirects=True, timeout=HTTP_TIMEOUT) as response:
            if response.status_code >= 400:
                raise ApiError(502, f"fetching the provider's result image failed with HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ApiError(502, f"the provider's result image is over {max_bytes} bytes", retryable=False)
            chunks: list[bytes] = []
            received = 0
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > max_bytes:
                    raise ApiError(502, f"the provider's result image is over {max_bytes} bytes", retryable=False)
                chunks.append(chunk)
            content_type = response.headers.get("content-type", "").split(";")[0].strip() or None
    except httpx.TimeoutException:
        raise ApiError(504, "fetching the provider's result image timed out") from None
    except httpx.HTTPError as exc:
        reason = redact(str(exc)) or type(exc).__name__
        raise ApiError(502, f"fetching the provider's result image failed: {reason}") from None
    return RemoteImage(b"".join(chunks), content_type)


async def run_all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Run the calls together and return their results in order.

    When one fails, or the caller is cancelled, the others are cancelled and
    awaited before the error propagates, so each gets to cancel its upstream work.
    """
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def describe_upstream_failure(redact: Redactor, what: str, exc: httpx.HTTPError) -> ApiError:
    """A transport failure talking to a provider: 504 for a timeout, 502 otherwise."""
    if isinstance(exc, httpx.TimeoutException):
        return ApiError(504, f"{what} did not answer in time")
    reason = redact(str(exc)) or type(exc).__name__
    return ApiError(502, f"{what} is unreachable: {reason}", code="UPSTREAM_ERROR")


def max_result_bytes(max_output_side: int) -> int:
    """The cap on one downloaded result: an uncompressed 8-bit RGBA picture at the largest side allowed, plus slack."""
    return max_output_side * max_output_side * 4 + (1 << 20)


def json_body(response: httpx.Response) -> Any:
    """The response's JSON, or None when it has none."""
    try:
        return response.json()
    except ValueError:
        return None
