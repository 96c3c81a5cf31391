"""POST /v1/images/edits: parse the form, build a Job, run or plan it, respond."""
from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from server import catalog, imagework, imaging, net, webhooks
from server.api.guards import principal
from server.api.protocol import AsyncAccepted, DryRunResponse, EditForm, ErrorResponse, ImagesResponse
from server.catalog import ModelEntry
from server.config import Settings
from server.errors import (Cancelled, DeadlineExceeded, InternalError, InvalidInput, LoupeError, NotFound,
                           QueueFull, StorageFull, Unavailable, UnsupportedMediaType)
from server.jobs import Job, OutputFormat, SourceImage, resolve_target
from server.request_store import RequestRow
from server.progress import Channel
from server.serving import Services, dry_run, run
from server.storage import write_atomically

router = APIRouter()
log = logging.getLogger("loupe.requests")

_KNOWN_FIELDS = set(EditForm.model_fields) | {"image", "image[]"}
_MAX_FIELDS = 64


def _form_schema() -> dict[str, Any]:
    schema = EditForm.model_json_schema()
    schema["properties"]["image"] = {
        "type": "string",
        "format": "binary",
        "description": "The image: a file, or a string holding an http(s) URL or a data: URI",
    }
    schema["required"] = ["model", "image"]
    schema["additionalProperties"] = {"type": "string"}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 502, 503, 504)
}


@router.post(
    "/images/edits",
    response_model=ImagesResponse | DryRunResponse,
    responses={**_ERRORS, 202: {"model": AsyncAccepted, "description": "Accepted to run in the background: with "
                                "a webhook_url, or with `Prefer: respond-async`"}},
    openapi_extra=_form_schema(),
    summary="Upscale an image (OpenAI images.edit compatible)",
)
async def edit_image(
    request: Request, dry_run_flag: bool = Query(False, alias="dryRun", description="Check and plan without running")
) -> Response:
    services: Services = request.app.state.services
    channel = services.progress.claim(principal(request), request.state.request_id)  # 409 while the id is in use
    try:
        return await _edit(request, services, channel, dry_run_flag)
    except BaseException:
        # Whatever ended the request, before or during its run, a watcher of its progress learns it is over.
        channel.update("failed")
        raise


async def _edit(request: Request, services: Services, channel: Channel, dry_run_flag: bool) -> Response:
    settings = services.settings
    request_id, owner = request.state.request_id, principal(request)
    form, image_field, extra = await _read_form(request, settings)
    try:
        entry = await _resolve_model(form.model, services)
        # A catalog or custom id, never the client's own string: metric labels must stay a bounded set.
        request.state.model_label = entry.id if entry.local is not None or catalog.find(entry.id) else "(gateway)"
        source = await _load_image(image_field, settings)
        job = _build_job(request_id, form, entry, source, extra)
        background = form.webhook_url is not None or _prefers_async(request)
        if background and form.response_format == "b64_json":
            raise InvalidInput("an async request's result is kept and sent by URL: drop response_format=b64_json, "
                               "or send the edit synchronously", "response_format")
        if form.webhook_url is not None:
            await webhooks.check_url(form.webhook_url, settings)
    except LoupeError as error:
        if not dry_run_flag:  # an edit refused at once is recorded too, with why
            await services.tracker.rejected(request_id, owner, form.model, error)
        raise
    headers = {"X-Loupe-Model": job.requested_model}
    if dry_run_flag:
        planned = await dry_run(job, services)
        channel.update("done")
        request.state.provider = headers["X-Loupe-Provider"] = planned.provider
        return JSONResponse(planned.model_dump(), headers=headers)
    base_url = (settings.public_url or str(request.base_url)).rstrip("/")
    if background:
        return await _submit(services, job, channel, form, extra, owner, base_url)
    cancel = threading.Event()  # set by the client going away, the deadline, or DELETE /v1/requests/{id}
    await services.tracker.begin(request_id, owner, form.model, cancel=cancel)
    started = functools.partial(services.tracker.started, request_id, owner)
    try:
        response = await _run_until_disconnect(request, run(job, services, channel, cancel, base_url, started),
                                               cancel, settings)
    except BaseException as error:
        await asyncio.shield(services.tracker.failed(request_id, owner, error))
        raise
    await services.tracker.completed(request_id, owner, response)
    request.state.provider = headers["X-Loupe-Provider"] = response.metadata.provider
    return StreamingResponse(_images_body(response), media_type="application/json", headers=headers)


def _prefers_async(request: Request) -> bool:
    """`Prefer: respond-async` (RFC 7240), among any other preferences."""
    preferences = ",".join(request.headers.getlist("prefer")).lower()
    return any(part.split(";")[0].split("=")[0].strip() == "respond-async" for part in preferences.split(","))


async def _submit(services: Services, job: Job, channel: Channel, form: EditForm, extra: dict[str, str],
                  owner: str | None, base_url: str) -> JSONResponse:
    """Record the job pending, keep its image, start it in the background, and answer 202."""
    tracker = services.tracker
    spec = {"form": form.model_dump(exclude_none=True), "extra": extra, "filename": job.image.filename,
            "base_url": base_url}
    row = await tracker.begin(job.request_id, owner, form.model, webhook_url=form.webhook_url, job=spec)
    try:  # only once the id is this request's: another's kept image is never overwritten
        await asyncio.to_thread(_keep_input, tracker.input_path(job.request_id, owner), job.image.data)
    except OSError as error:
        failure = (StorageFull("the server's disk is full, so it can't keep the request's image; try again later, "
                               "or send the edit synchronously") if error.errno in (errno.ENOSPC, errno.EDQUOT)
                   else Unavailable(f"the server could not keep the request's image ({error.strerror}); tell the "
                                    "operator", code="STORAGE_UNAVAILABLE", transient=False))
        await tracker.failed(job.request_id, owner, failure)
        raise failure from None
    _start(services, job, channel, owner, base_url)
    accepted = AsyncAccepted(id=row.id, status=row.status, created=int(row.created), model=row.model)
    return JSONResponse(accepted.model_dump(), status_code=202,
                        headers={"Location": f"/v1/requests/{row.id}", "Preference-Applied": "respond-async",
                                 "X-Loupe-Model": job.requested_model})


def _keep_input(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)


def _start(services: Services, job: Job, channel: Channel, owner: str | None, base_url: str) -> None:
    async def work(cancel: threading.Event, on_start: Callable[[], None]) -> ImagesResponse:
        try:
            while True:  # pending, a job waits its turn where a sync one would be told to come back later
                try:
                    return await run(job, services, channel, cancel, base_url, on_start)
                except QueueFull as full:
                    await asyncio.sleep(full.retry_after_s or 1.0)
        except BaseException:
            channel.update("failed")
            raise

    services.tracker.run_in_background(job.request_id, owner, work)


async def resume_pending(services: Services) -> None:
    """At start-up: the last process's computing requests are marked failed; its pending async ones start again."""
    for row in await services.tracker.recover():
        try:
            job, base_url = await _rebuild(services, row)
            channel = services.progress.claim(row.owner, row.id)
        except Exception as error:  # that one request fails; the server starts, and the others run
            if not isinstance(error, LoupeError):
                log.exception("request %s could not be resumed", row.id)
            await services.tracker.failed(row.id, row.owner, error)
            continue
        _start(services, job, channel, row.owner, base_url)


async def _rebuild(services: Services, row: RequestRow) -> tuple[Job, str]:
    """A pending request's job, from the form and the image bytes kept when it was accepted."""
    spec = row.job or {}
    try:
        data = await asyncio.to_thread(services.tracker.input_path(row.id, row.owner).read_bytes)
        form = EditForm.model_validate(spec["form"])
        base_url = str(spec["base_url"])
    except (OSError, KeyError, ValidationError):
        raise InternalError("the server restarted and could not find this request's kept inputs; send it again",
                            code="INPUTS_LOST") from None
    entry = await _resolve_model(form.model, services)
    source = await asyncio.to_thread(imagework.source_image, data, spec.get("filename", "image"),
                                     services.settings.max_input_pixels)
    return _build_job(row.id, form, entry, source, spec.get("extra", {})), base_url


def _images_body(response: ImagesResponse) -> Iterator[bytes]:
    """The response's JSON, each distinct image encoded once: the n copies of a deterministic result, sent as
    b64_json, take the memory of one."""
    fields = response.model_dump(exclude_none=True)
    del fields["data"]
    yield _json(fields)[:-1] + b',"data":['
    encoded: dict[int, bytes] = {}
    for index, item in enumerate(response.data):
        key = id(item.b64_json) if item.b64_json is not None else id(item)
        if key not in encoded:
            encoded[key] = _json(item.model_dump(exclude_none=True))
        if index:
            yield b","
        yield encoded[key]
    yield b"]}"


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


async def _run_until_disconnect(request: Request, work: Any, cancel: threading.Event, settings: Settings) -> Any:
    """Run the work, cancelling it when the client goes away or the request times out."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        cancel.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if watcher in done:
            raise Cancelled("the client closed the request", code="CLIENT_CLOSED")
        raise DeadlineExceeded(f"the request took longer than {settings.request_timeout_s:g} s "
                               "(LOUPE_REQUEST_TIMEOUT_S)")
    finally:
        watcher.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


async def _read_form(request: Request, settings: Settings) -> tuple[EditForm, UploadFile | str, dict[str, str]]:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise UnsupportedMediaType("send the request as multipart/form-data, as the openai SDK does")
    # A data: URI image is a text field, so text parts may be as large as an upload, base64-encoded.
    form = await request.form(max_files=2, max_fields=_MAX_FIELDS, max_part_size=settings.max_image_field_chars)
    images = form.getlist("image") + form.getlist("image[]")
    if not images:
        raise InvalidInput("the image field is required: a file, an http(s) URL or a data: URI", "image")
    if len(images) > 1:
        raise InvalidInput("send one image per request", "image")
    fields: dict[str, str] = {}
    extra: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in ("image", "image[]"):
            continue
        if not isinstance(value, str):
            raise InvalidInput(f"only `image` may be a file; `{key}` was a file", key)
        if key in _KNOWN_FIELDS:
            fields[key] = value
        else:
            extra[key] = value
    try:
        parsed = EditForm.model_validate({k: v for k, v in fields.items() if v != ""})
    except ValidationError as error:
        first = error.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        message = first["msg"].removeprefix("Value error, ")
        raise InvalidInput(f"{param}: {message}" if param else message, param) from None
    return parsed, images[0], extra


async def _resolve_model(name: str, services: Services) -> ModelEntry:
    entry = await services.engine.find(name)  # a new custom file is read first
    if entry is not None:
        return entry
    if services.providers.route(None, name) is not None:
        return ModelEntry(id=name, description="forwarded unchanged to the gateway", default_scale=2)
    raise NotFound(f"the model `{name}` does not exist; GET /v1/models lists the models", "model",
                   code="MODEL_NOT_FOUND")


async def _load_image(field: UploadFile | str, settings: Settings) -> SourceImage:
    if isinstance(field, UploadFile):
        data = await net.read_capped(_chunks(field), settings.max_upload_bytes)
        filename = field.filename or "image"
    elif field[:5].lower() == "data:":  # URI schemes are case-insensitive (RFC 3986)
        data = net.decode_data_uri(field, max_bytes=settings.max_upload_bytes)
        filename = "image"
    elif field.lower().startswith(("http://", "https://")):
        data, _ = await net.fetch_image_url(field, settings=settings)
        filename = field.rsplit("/", 1)[-1][:100] or "image"
    else:
        raise InvalidInput("image must be a file, an http(s) URL or a data: URI", "image")
    return await asyncio.to_thread(imagework.source_image, data, filename, settings.max_input_pixels)


async def _chunks(upload: UploadFile, size: int = 1 << 20) -> Any:
    while chunk := await upload.read(size):
        yield chunk


def _build_job(request_id: str, form: EditForm, entry: ModelEntry, source: SourceImage, extra: dict[str, str]) -> Job:
    scale, target = resolve_target(entry, source.width, source.height, form.scale_factor, form.size_pixels())
    output_format: OutputFormat = (
        "jpeg" if form.output_format == "jpg" else form.output_format or imaging.default_output_format(source.format)
    )
    return Job(
        request_id=request_id,
        requested_model=form.model,
        entry=entry,
        image=source,
        scale=scale,
        target=target,
        output_format=output_format,
        response_format=form.response_format,
        output_compression=form.output_compression,
        n=form.n,
        seed=form.seed,
        prompt=form.prompt,
        user=form.user,
        scale_given=form.scale_factor is not None or form.size_pixels() is not None,
        size_given=form.size,
        extra=extra,
    )
