"""fal.ai over its queue protocol, without the SDK.

Submit `POST {fal_url}/{app_id}`; poll the `status_url` the submit returned (202
while IN_QUEUE or IN_PROGRESS, 200 once COMPLETED); read `response_url`; fetch
the images it names. A cancelled caller or a passed deadline sends `PUT
cancel_url`. The submit is never retried, since it may already be queued and
billed; status and result reads are, with backoff and jitter.

An input image over LOUPE_FAL_UPLOAD_THRESHOLD_BYTES goes to fal storage first,
once for all n calls: `POST {fal_storage_url}/storage/upload/initiate` with the
key answers a signed `upload_url` and a `file_url`; the bytes are `PUT` to the
upload URL, without the key, and the apps get the file URL.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import httpx

from server.catalog import FalRoute, ModelEntry
from server.config import Settings
from server.errors import InvalidInput, UpstreamFailed, UpstreamRejected, UpstreamTimeout
from server.jobs import Job
from server.logs import Redactor
from server.remote import normalize
from server.outbound import Credentials, Outbound, origin_of
from server.remote.base import RemoteImage, RemoteResult, Upstream, json_body, max_result_bytes, run_all
from server.remote.breaker import CircuitBreaker

log = logging.getLogger("loupe.remote.fal")

_POLL_FIRST_S = 0.1
_POLL_MAX_S = 3.0
_POLL_GROWTH = 1.5
_READ_ATTEMPTS = 5  # per status poll or result read, when fal answers with a transient failure
_TRANSIENT_STATUSES = (429, 502, 503, 504)
_CANCEL_TIMEOUT = httpx.Timeout(10.0)
_STORAGE_TYPE = "fal-cdn-v3"


def _jitter(seconds: float) -> float:
    return seconds * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class _Queued:
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str | None


class FalProvider:
    name = "fal"
    display_name = "fal.ai"

    def __init__(self, settings: Settings, http: httpx.AsyncClient, policy: Outbound, *,
                 breaker: CircuitBreaker | None = None) -> None:
        if not settings.fal_key:
            raise ValueError("FalProvider needs LOUPE_FAL_KEY")
        self._base = settings.fal_url.rstrip("/")
        self._storage = settings.fal_storage_url.rstrip("/")
        self._upload_threshold = settings.fal_upload_threshold_bytes
        key = {"Authorization": f"Key {settings.fal_key}"}
        self._timeout_s = settings.remote_timeout_s
        self._max_image_bytes = max_result_bytes(settings.max_output_side)
        self._redact = Redactor([settings.fal_key, settings.gateway_key])
        self._queue = Upstream(self.display_name, policy, http, Credentials(key, origin_of(self._base)), self._redact)
        self._store = Upstream("fal.ai storage", policy, http, Credentials(key, origin_of(self._storage)), self._redact)
        self.breaker = breaker or CircuitBreaker(self.display_name)
        self._cancels: set[asyncio.Task[None]] = set()

    def serves(self, entry: ModelEntry | None, model_id: str) -> bool:
        return entry is not None and entry.fal is not None

    def available(self) -> bool:
        return self.breaker.allows()

    async def upscale(self, job: Job) -> RemoteResult:
        route = self._route(job)
        params = normalize.fal_params(job, route)  # the client's 400s, before anything is uploaded
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        image_url = await self._image_url(job, route, deadline)
        inputs = normalize.fal_inputs(job, route, params, image_url)
        images = await run_all(self._run(route, payload, job.request_id, deadline) for payload in inputs)
        return RemoteResult(images, self.name, self.display_name, f"fal/{route.app_id}", job.entry.cost(job.target, job.n))

    async def dry_run(self, job: Job) -> dict[str, Any]:
        route = self._route(job)
        normalize.fal_params(job, route)  # the same 400s the real call would give
        return estimate(job, self.name, f"fal/{route.app_id}")

    async def aclose(self) -> None:
        if self._cancels:
            await asyncio.gather(*self._cancels, return_exceptions=True)

    def _route(self, job: Job) -> FalRoute:
        if job.entry.fal is None:
            raise InvalidInput(f"{job.requested_model} can't run on fal.ai", "model")
        return job.entry.fal

    async def _image_url(self, job: Job, route: FalRoute, deadline: float) -> str:
        """The image as the app's `image_url`: a data: URI, or the URL of a fal storage upload when it is large."""
        data, media_type = await asyncio.to_thread(normalize.fal_image, job.image, route.input_formats)
        if len(data) <= self._upload_threshold:
            return await asyncio.to_thread(normalize.data_uri, data, media_type)
        file_name = f"{job.request_id}.{media_type.removeprefix('image/')}"
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        with self.breaker.call():
            try:
                file_url = await asyncio.wait_for(self._upload(data, media_type, file_name), remaining)
            except asyncio.TimeoutError:
                raise self._deadline_error() from None
        log.info("uploaded %d bytes to fal storage for %s", len(data), job.request_id)
        return file_url

    async def _upload(self, data: bytes, media_type: str, file_name: str) -> str:
        """Store the image with fal and return its file URL. Not retried: a failure is the client's to retry."""
        response = await self._store.call("POST", f"{self._storage}/storage/upload/initiate",
                                          params={"storage_type": _STORAGE_TYPE},
                                          json={"file_name": file_name, "content_type": media_type})
        if response.status_code >= 400:
            raise self._storage_error(response)
        body = json_body(response)
        upload_url = body.get("upload_url") if isinstance(body, dict) else None
        file_url = body.get("file_url") if isinstance(body, dict) else None
        if not (_is_web_url(upload_url) and _is_web_url(file_url)):
            raise UpstreamFailed("fal.ai storage answered without an upload_url and a file_url")
        # The upload URL is signed and on another host: it gets the bytes, never the key, and only if the outbound
        # policy lets Loupe reach where it points.
        uploaded = await self._store.call("PUT", upload_url, content=data, headers={"Content-Type": media_type})
        if uploaded.status_code >= 300:
            log.warning("fal.ai storage refused the upload with HTTP %s", uploaded.status_code)
            raise UpstreamFailed(f"uploading the image to fal.ai storage failed with HTTP {uploaded.status_code}",
                                 transient=_worth_retrying(uploaded.status_code))
        return file_url

    def _storage_error(self, response: httpx.Response) -> UpstreamFailed:
        """fal storage refusing the image: never the client's doing, so a 502 (or 504), with fal's reason."""
        status = response.status_code
        body = json_body(response)
        detail = body.get("detail") if isinstance(body, dict) else None
        message = self._redact(detail if isinstance(detail, str) else response.text[:300].strip())
        message = message or response.reason_phrase
        log.warning("fal.ai storage answered HTTP %s: %s", status, message)
        if status in (401, 403):
            return UpstreamFailed("fal.ai storage refused this server's credentials (LOUPE_FAL_KEY)",
                                  code="UPSTREAM_AUTH", transient=False)
        if status == 504:
            return UpstreamTimeout(f"fal.ai storage timed out: {message}")
        return UpstreamFailed(f"fal.ai storage could not take the image: {message}",
                              transient=_worth_retrying(status))

    async def _run(
        self, route: FalRoute, payload: dict[str, object], request_id: str, deadline: float
    ) -> RemoteImage:
        loop = asyncio.get_running_loop()
        with self.breaker.call():
            try:
                queued = await asyncio.wait_for(self._submit(route, payload), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise self._deadline_error() from None
            log.info("fal request %s queued on %s for %s", queued.request_id, route.app_id, request_id)
            try:
                return await asyncio.wait_for(self._finish(route, queued), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await self._cancel(queued)
                raise self._deadline_error() from None
            except asyncio.CancelledError:
                # Shielded: a second cancellation of the caller must not stop fal from hearing about the first.
                task = asyncio.ensure_future(self._cancel(queued))
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)
                await asyncio.shield(task)
                raise

    def _deadline_error(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"fal.ai did not finish within {self._timeout_s:g} s (LOUPE_REMOTE_TIMEOUT_S)")

    async def _submit(self, route: FalRoute, payload: dict[str, object]) -> _Queued:
        response = await self._queue.call("POST", f"{self._base}/{route.app_id}", json=payload)
        if response.status_code >= 400:
            raise self._error(response, route)
        body = json_body(response)
        if not isinstance(body, dict) or not all(
            isinstance(body.get(key), str) for key in ("request_id", "status_url", "response_url")
        ):
            raise UpstreamFailed("fal.ai answered the submit without its queue URLs")
        cancel_url = body.get("cancel_url") if isinstance(body.get("cancel_url"), str) else None
        queued = _Queued(body["request_id"], body["status_url"], body["response_url"], cancel_url)
        # The key goes with every poll: never to a host other than the one configured.
        for url in (queued.status_url, queued.response_url, queued.cancel_url):
            if url is not None and origin_of(url) != origin_of(self._base):
                raise UpstreamFailed("fal.ai answered with queue URLs on another host; Loupe won't send its key there")
        return queued

    async def _finish(self, route: FalRoute, queued: _Queued) -> RemoteImage:
        await self._wait(queued)
        response = await self._read(queued.response_url)
        if response.status_code >= 400:
            raise self._error(response, route)
        url = _first_image_url(json_body(response), route)
        return await self._queue.download(url, max_bytes=self._max_image_bytes)

    async def _wait(self, queued: _Queued) -> None:
        delay = _POLL_FIRST_S
        while True:
            await asyncio.sleep(_jitter(delay))
            delay = min(delay * _POLL_GROWTH, _POLL_MAX_S)
            response = await self._read(queued.status_url)
            if response.status_code >= 400:
                raise UpstreamFailed(f"fal.ai lost track of request {queued.request_id} (status HTTP "
                                     f"{response.status_code})")
            body = json_body(response)
            status = body.get("status") if isinstance(body, dict) else None
            if status == "COMPLETED":
                return
            log.debug("fal request %s: %s", queued.request_id, status)

    async def _read(self, url: str) -> httpx.Response:
        """GET a queue URL, retrying transport errors and transient statuses; the last answer is returned."""
        attempt = 0
        while True:
            attempt += 1
            last = attempt == _READ_ATTEMPTS
            try:
                response = await self._queue.call("GET", url)
            except UpstreamFailed as failure:
                if last or not failure.transient:
                    raise
                log.warning("fal.ai read failed, retrying: %s", failure.message)
            else:
                definitive = "x-fal-error-type" in response.headers
                if last or definitive or response.status_code not in _TRANSIENT_STATUSES:
                    return response
                log.warning("fal.ai answered HTTP %s, retrying", response.status_code)
            await asyncio.sleep(_jitter(0.2 * 2**attempt))

    def _error(self, response: httpx.Response, route: FalRoute) -> UpstreamFailed | UpstreamRejected:
        """fal's error answer as the client's error: its own mistakes keep their 4xx, fal's become 502 or 504."""
        status = response.status_code
        body = json_body(response)
        detail = body.get("detail") if isinstance(body, dict) else None
        param = None
        if isinstance(detail, list):
            parts = []
            for item in detail:
                if not isinstance(item, dict):
                    continue
                field = _field_of(item.get("loc"))
                parts.append(f"{field}: {item.get('msg', '')}" if field else str(item.get("msg", "")))
                if param is None and field is not None:
                    param = _loupe_name(field, route)
            message = "; ".join(parts)
        elif isinstance(detail, str):
            message = detail
        else:
            message = response.text[:300].strip()
        message = self._redact(message) or response.reason_phrase
        error_type = body.get("error_type") if isinstance(body, dict) else None
        error_type = str(error_type or response.headers.get("x-fal-error-type", ""))
        log.warning("fal.ai answered HTTP %s %s for %s: %s", status, error_type, route.app_id, message)
        if status in (401, 403):
            return UpstreamFailed("fal.ai refused this server's credentials (LOUPE_FAL_KEY)", code="UPSTREAM_AUTH",
                                  transient=False)
        if status in (402, 404):
            return UpstreamFailed(f"fal.ai could not run {route.app_id}: {message}", transient=False)
        if status < 500:
            return UpstreamRejected(status, f"fal.ai rejected the request: {message}", param)
        if status == 504 or error_type.endswith("timeout"):
            return UpstreamTimeout(f"fal.ai timed out: {message}")
        return UpstreamFailed(f"fal.ai failed: {message}")

    async def _cancel(self, queued: _Queued) -> None:
        if queued.cancel_url is None:
            log.warning("fal request %s can't be cancelled: the submit gave no cancel_url", queued.request_id)
            return
        try:
            response = await self._queue.call("PUT", queued.cancel_url, timeout=_CANCEL_TIMEOUT)
        except UpstreamFailed as failure:
            log.warning("cancelling fal request %s failed: %s", queued.request_id, failure.message)
            return
        log.info("fal request %s cancelled (HTTP %s)", queued.request_id, response.status_code)


def _worth_retrying(status: int) -> bool:
    """Whether storage may take the same upload later: it was busy or failing, not refusing this image."""
    return status == 429 or status >= 500


def _is_web_url(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and urlsplit(value).scheme in ("http", "https")


def _field_of(loc: object) -> str | None:
    """The input field a validation error's `loc` (e.g. ["body", "image_url"]) points at."""
    if isinstance(loc, list) and len(loc) >= 2 and loc[0] == "body" and isinstance(loc[1], str):
        return loc[1]
    return None


def _loupe_name(field: str, route: FalRoute) -> str:
    """The client's name for a field of the app's input."""
    ours = {upstream: name for name, upstream in route.renamed.items()}
    ours["image_url"] = "image"
    if route.scale_field is not None:
        ours[route.scale_field] = "scale_factor"
    return ours.get(field, field)


def _first_image_url(output: object, route: FalRoute) -> str:
    """The first image of an app's output: `{images: [...]}` or `{image: ...}`, each a URL or `{url, ...}`."""
    other = "images" if route.output == "image" else "image"
    for key in (route.output, other):
        value = output.get(key) if isinstance(output, dict) else None
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, dict):
            value = value.get("url")
        if isinstance(value, str) and value:
            return value
    raise UpstreamFailed(f"fal.ai's result for {route.app_id} holds no image")


def estimate(job: Job, provider: str, executed_model: str) -> dict[str, Any]:
    """The gateway's dry-run fields, from the catalog's price for the job's output size."""
    components: list[dict[str, Any]] = []
    price = job.entry.price
    if price is not None:
        pixels = job.target[0] * job.target[1]
        if price.per_megapixel is not None:
            metric, quantity, unit_price = "megapixel", round(pixels / 1_000_000 * job.n, 6), price.per_megapixel
        else:
            metric, quantity, unit_price = "image", job.n, price.cost(pixels)
        components.append({
            "type": "output",
            "metric": metric,
            "quantity": quantity,
            "billable_quantity": quantity,
            "unit_price": unit_price,
            "total_cost": round(unit_price * quantity * 1_000_000),
        })
    return {
        "estimated": True,
        "model": job.requested_model,
        "provider": provider,
        "total_cost_micros": sum(component["total_cost"] for component in components),
        "currency": "USD",
        "components": components,
        "executed_model": executed_model,
    }
