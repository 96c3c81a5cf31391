"""What every remote provider shares: the result types, the Provider protocol and careful HTTP helpers.

The helpers keep upstream credentials out of everything a client or a log line
sees, fetch result images under a size cap, and run the n calls of an emulated
`n` together so that one failure cancels the others.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx

from server import net
from server.catalog import ModelEntry
from server.errors import InvalidInput, TooLarge, UpstreamFailed, UpstreamTimeout
from server.jobs import Job
from server.logs import Redactor

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


def same_origin(url: str, base: str) -> bool:
    """Whether `url` is on the scheme, host and port of `base`: only there may a provider's key be sent."""
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


@contextmanager
def _provider_image() -> Iterator[None]:
    """The client-input readers of net.py, reading what a provider sent: their refusals are its failures."""
    try:
        yield
    except TooLarge as error:
        raise UpstreamFailed(f"the provider returned an image too large: {error.message}", transient=False) from None
    except InvalidInput as error:
        raise UpstreamFailed(f"the provider returned an image Loupe can't read: {error.message}") from None


def decode_base64(payload: str, max_bytes: int) -> bytes:
    with _provider_image():
        return net.decode_base64(payload, max_bytes=max_bytes)


def decode_data_uri(uri: str, max_bytes: int) -> RemoteImage:
    with _provider_image():
        data = net.decode_data_uri(uri, max_bytes=max_bytes)
    media_type = uri.partition(",")[0][len("data:"):].split(";")[0].strip().lower()
    return RemoteImage(data, media_type or None)


async def download(
    http: httpx.AsyncClient, url: str, *, max_bytes: int, redact: Redactor, headers: dict[str, str] | None = None
) -> RemoteImage:
    """A result image named by the provider: a data: URI, or an http(s) URL streamed under `max_bytes`."""
    if url[:5].lower() == "data:":
        return decode_data_uri(url, max_bytes)
    if urlsplit(url).scheme not in ("http", "https"):
        raise UpstreamFailed("the provider returned an image link Loupe can't fetch")
    try:
        async with http.stream("GET", url, headers=headers, follow_redirects=True, timeout=HTTP_TIMEOUT) as response:
            if response.status_code >= 400:
                raise UpstreamFailed(f"fetching the provider's result image failed with HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise UpstreamFailed(f"the provider's result image is over {max_bytes} bytes", transient=False)
            with _provider_image():
                data = await net.read_capped(response.aiter_bytes(), max_bytes)
            content_type = response.headers.get("content-type", "").split(";")[0].strip() or None
    except httpx.TimeoutException:
        raise UpstreamTimeout("fetching the provider's result image timed out") from None
    except httpx.HTTPError as exc:
        reason = redact(str(exc)) or type(exc).__name__
        raise UpstreamFailed(f"fetching the provider's result image failed: {reason}") from None
    return RemoteImage(data, content_type)


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


def describe_upstream_failure(redact: Redactor, what: str, exc: httpx.HTTPError) -> UpstreamFailed:
    """A transport failure talking to a provider: 504 for a timeout, 502 otherwise."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"{what} did not answer in time")
    reason = redact(str(exc)) or type(exc).__name__
    return UpstreamFailed(f"{what} is unreachable: {reason}")


def max_result_bytes(max_output_side: int) -> int:
    """The cap on one downloaded result: an uncompressed 8-bit RGBA picture at the largest side allowed, plus slack."""
    return max_output_side * max_output_side * 4 + (1 << 20)


def json_body(response: httpx.Response) -> Any:
    """The response's JSON, or None when it has none."""
    try:
        return response.json()
    except ValueError:
        return None
