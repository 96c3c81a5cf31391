"""An OpenAI-compatible gateway (Lumenfall, or another Loupe) as a provider.

It speaks Loupe's own protocol: the job goes as a multipart `POST
{gateway_url}/images/edits` (with `?dryRun=true` for a dry run), and the answer
holds `data: [{url} | {b64_json}]` and `metadata`. Any model id is forwarded
unchanged, so models missing from Loupe's catalog work too.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx

from server.catalog import ModelEntry
from server.config import Settings
from server.errors import UpstreamFailed, UpstreamRejected, UpstreamTimeout
from server.jobs import Job
from server.logs import Redactor
from server.remote import normalize
from server.outbound import Credentials, Outbound, origin_of
from server.remote.base import RemoteImage, RemoteResult, Upstream, decode_base64, json_body, max_result_bytes, run_all
from server.remote.breaker import CircuitBreaker

log = logging.getLogger("loupe.remote.gateway")
T = TypeVar("T")

_DRY_RUN_FIELDS = ("total_cost_micros", "currency", "components")


class GatewayProvider:
    name = "gateway"
    display_name = "gateway"

    def __init__(self, settings: Settings, http: httpx.AsyncClient, policy: Outbound, *,
                 breaker: CircuitBreaker | None = None) -> None:
        if not settings.gateway_url:
            raise ValueError("GatewayProvider needs LOUPE_GATEWAY_URL")
        self._base = settings.gateway_url.rstrip("/")
        key = {"Authorization": f"Bearer {settings.gateway_key}"} if settings.gateway_key else {}
        self._timeout_s = settings.remote_timeout_s
        self._max_image_bytes = max_result_bytes(settings.max_output_side)
        self._redact = Redactor([settings.gateway_key, settings.fal_key])
        # Its own links may need the key; anyone else's must not see it.
        self._upstream = Upstream("the gateway", policy, http, Credentials(key, origin_of(self._base)), self._redact)
        self.breaker = breaker or CircuitBreaker("the gateway")

    def serves(self, entry: ModelEntry | None, model_id: str) -> bool:
        return entry is None or entry.gateway

    def available(self) -> bool:
        return self.breaker.allows()

    async def upscale(self, job: Job) -> RemoteResult:
        normalize.check_scale(job, job.entry.scale, "the gateway")
        with self.breaker.call():
            body, images = await self._within_deadline(self._upscale(job))
        metadata = body.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        executed_model = metadata.get("executed_model")
        cost = metadata.get("cost")
        return RemoteResult(
            images=images,
            provider=self.name,
            provider_name=self.display_name,
            executed_model=executed_model if isinstance(executed_model, str) else job.requested_model,
            cost=float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None,
        )

    async def dry_run(self, job: Job) -> dict[str, Any]:
        normalize.check_scale(job, job.entry.scale, "the gateway")
        with self.breaker.call():
            body = await self._within_deadline(self._post(job, dry_run=True))
        components = body.get("components")
        if not all(key in body for key in _DRY_RUN_FIELDS) or not isinstance(components, list) or not all(
            isinstance(component, dict) and component.get("type") in ("input", "output") for component in components
        ):
            raise UpstreamFailed("the gateway's dry run lacks its cost fields")
        upstream = "/".join(str(body[key]) for key in ("provider", "model") if body.get(key))
        return {
            "estimated": True,
            "model": job.requested_model,
            "provider": self.name,
            **{key: body[key] for key in _DRY_RUN_FIELDS},
            "executed_model": upstream or job.requested_model,
        }

    async def aclose(self) -> None:
        return None

    async def _within_deadline(self, call: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(call, self._timeout_s)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(
                f"the gateway did not finish within {self._timeout_s:g} s (LOUPE_REMOTE_TIMEOUT_S)") from None

    async def _upscale(self, job: Job) -> tuple[dict[str, Any], list[RemoteImage]]:
        body = await self._post(job, dry_run=False)
        data = body.get("data")
        if not isinstance(data, list) or not data or not all(isinstance(item, dict) for item in data):
            raise UpstreamFailed("the gateway answered without images")
        return body, await run_all(self._image(item) for item in data)

    async def _post(self, job: Job, *, dry_run: bool) -> dict[str, Any]:
        image = job.image
        response = await self._upstream.call("POST", f"{self._base}/images/edits",
                                             params={"dryRun": "true"} if dry_run else None,
                                             data=normalize.gateway_form(job),
                                             files={"image": (image.filename, image.data, image.media_type)})
        if response.status_code >= 400:
            raise self._error(response)
        body = json_body(response)
        if not isinstance(body, dict):
            raise UpstreamFailed("the gateway answered with something other than a JSON object")
        return body

    async def _image(self, item: dict[str, Any]) -> RemoteImage:
        encoded, url = item.get("b64_json"), item.get("url")
        if isinstance(encoded, str) and encoded:
            return RemoteImage(decode_base64(encoded, self._max_image_bytes), None)
        if isinstance(url, str) and url:
            return await self._upstream.download(url, max_bytes=self._max_image_bytes)
        raise UpstreamFailed("the gateway answered with an image that has neither url nor b64_json")

    def _error(self, response: httpx.Response) -> UpstreamFailed | UpstreamRejected:
        """The gateway speaks the client's protocol, so its 4xx are relayed; its 5xx become 502 or 504."""
        status = response.status_code
        body = json_body(response)
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        message = self._redact(str(error.get("message") or response.text[:300]).strip()) or response.reason_phrase
        param = error.get("param") if isinstance(error.get("param"), str) else None
        code = error.get("code") if isinstance(error.get("code"), str) else None
        log.warning("the gateway answered HTTP %s %s: %s", status, code or "", message)
        if status in (401, 403):
            return UpstreamFailed("the gateway refused this server's credentials (LOUPE_GATEWAY_KEY)",
                                  code="UPSTREAM_AUTH", transient=False)
        if status == 402:
            return UpstreamFailed(f"the gateway account can't pay for this request: {message}", transient=False)
        if status < 500:
            return UpstreamRejected(status, message, param, code=code)
        if status == 504:
            return UpstreamTimeout(f"the gateway timed out: {message}")
        return UpstreamFailed(f"the gateway failed: {message}", code=code)
