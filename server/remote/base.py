"""What every remote provider shares: the result types, the Provider protocol and careful HTTP helpers.

The helpers send every call through the outbound policy (the provider's key only to its own origin),
keep upstream credentials out of everything a client or a log line sees, fetch result images under a
size cap, and run the n calls of an emulated `n` together so that one failure cancels the others.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx

from server import net, outbound
from server.catalog import ModelEntry
from server.errors import InvalidInput, TooLarge, UpstreamFailed, UpstreamTimeout
from server.jobs import Job
from server.logs import Redactor
from server.outbound import Credentials, Outbound

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


@dataclass(frozen=True)
class Upstream:
    """How a provider talks HTTP: every call through the outbound policy, its key only to its own origin, and
    every transport failure as a 502 or 504 in the provider's name."""

    name: str  # "fal.ai", "the gateway": how messages name it
    policy: Outbound
    http: httpx.AsyncClient
    credentials: Credentials | None
    redact: Redactor

    async def call(self, method: str, url: str, *, timeout: httpx.Timeout = HTTP_TIMEOUT,
                   **body: Any) -> httpx.Response:
        """One request (no redirects followed: a redirect is the answer)."""
        try:
            return await self.policy.send(self.http, method, url, noun="the URL", timeout=timeout,
                                          credentials=self.credentials, **body)
        except outbound.TimedOut:
            raise UpstreamTimeout(f"{self.name} did not answer in time") from None
        except outbound.Blocked as failure:
            raise UpstreamFailed(f"{self.name} pointed Loupe at an address it won't reach: {failure.message}",
                                 transient=False) from None
        except outbound.OutboundFailure as failure:
            raise UpstreamFailed(f"{self.name} is unreachable: {self.redact(failure.message)}") from None

    async def download(self, url: str, *, max_bytes: int) -> RemoteImage:
        """A result image the provider named: a data: URI, or an http(s) URL streamed under `max_bytes`, its
        redirects followed and each hop vetted."""
        if url[:5].lower() == "data:":
            return decode_data_uri(url, max_bytes)
        what = "the provider's result image"
        try:
            data, content_type = await self.policy.fetch(url, noun="the URL", max_bytes=max_bytes,
                                                         timeout_s=HTTP_TIMEOUT.read or 60.0, client=self.http,
                                                         credentials=self.credentials)
        except outbound.TimedOut:
            raise UpstreamTimeout(f"fetching {what} timed out") from None
        except outbound.Oversized:
            raise UpstreamFailed(f"{what} is over {max_bytes} bytes", transient=False) from None
        except outbound.Blocked as failure:
            raise UpstreamFailed(f"the provider pointed Loupe at an address it won't reach: {failure.message}",
                                 transient=False) from None
        except outbound.OutboundFailure as failure:
            raise UpstreamFailed(f"fetching {what} failed: {self.redact(failure.message)}") from None
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


def max_result_bytes(max_output_side: int) -> int:
    """The cap on one downloaded result: an uncompressed 8-bit RGBA picture at the largest side allowed, plus slack."""
    return max_output_side * max_output_side * 4 + (1 << 20)


def json_body(response: httpx.Response) -> Any:
    """The response's JSON, or None when it has none."""
    try:
        return response.json()
    except ValueError:
        return None
