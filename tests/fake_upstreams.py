"""Fake upstreams for the remote providers: real HTTP apps, served on 127.0.0.1 with `tests.servers.serve`.

`FakeFal` speaks fal's queue protocol. Its status, result and cancel URLs live
under `/queue-v9/{owner}/{alias}/...`, not under the app id, so a client that
rebuilds them instead of following the submit's answer gets 404s. It also answers
fal storage's upload initiate with a signed URL on `FakeFal.storage`, a second
server standing in for the signed-URL host, where its apps then read the image.
`FakeGateway` answers Loupe's own `POST /v1/images/edits`. Both upscale for real
(nearest neighbour, by the scale they were sent), check the key, and record what
they got. Tests change their behaviour through `reset(...)`.
"""
from __future__ import annotations

import asyncio
import base64
import io
import itertools
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from server import catalog
from server.jobs import Job, SourceImage

FAL_KEY = "fal-key-id-1234:fal-secret-abcdef987654"
GATEWAY_KEY = "lmnfl_gateway-secret-0123456789"


def pattern(width: int = 16, height: int = 12) -> Image.Image:
    """A small picture with a pattern, so an upscale of it can be checked by its size and content."""
    picture = Image.new("RGB", (width, height))
    picture.putdata([((x * 16) % 256, (y * 20) % 256, (x * y) % 256) for y in range(height) for x in range(width)])
    return picture


def encoded(picture: Image.Image, format: str = "PNG") -> bytes:
    out = io.BytesIO()
    picture.save(out, format=format)
    return out.getvalue()


def make_job(
    model_id: str,
    *,
    scale: float | None = None,
    n: int = 1,
    extra: dict[str, str] | None = None,
    seed: int | None = None,
    prompt: str | None = None,
    image: bytes | None = None,
) -> Job:
    """The Job the HTTP layer would build for this request (an unknown id gets the synthetic gateway entry)."""
    entry = catalog.find(model_id) or catalog.ModelEntry(id=model_id, description="", default_scale=2)
    data = image if image is not None else encoded(pattern())
    with Image.open(io.BytesIO(data)) as picture:
        (width, height), image_format = picture.size, picture.format or "PNG"
    factor = scale if scale is not None else entry.default_scale
    return Job(
        request_id="req-test",
        requested_model=model_id,
        entry=entry,
        image=SourceImage(data=data, width=width, height=height, format=image_format, filename="in.png"),
        scale=factor,
        target=(round(width * factor), round(height * factor)),
        output_format="png",
        n=n,
        seed=seed,
        prompt=prompt,
        scale_given=scale is not None,
        extra=extra or {},
    )


def _upscaled_png(image: bytes, scale: float) -> bytes:
    with Image.open(io.BytesIO(image)) as picture:
        size = (round(picture.width * scale), round(picture.height * scale))
        out = io.BytesIO()
        picture.convert("RGB").resize(size, Image.Resampling.NEAREST).save(out, format="PNG")
    return out.getvalue()


def _from_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64"), header
    return base64.b64decode(payload)


_FAL_SCALE_FIELDS = ("upscale_factor", "scale", "scale_factor")


@dataclass
class StorageInitiate:
    query: dict[str, str]
    body: Any
    authorization: str | None


@dataclass
class StorageUpload:
    name: str
    content_type: str | None
    authorization: str | None
    data: bytes


class FakeSignedStorage:
    """The host of fal storage's signed upload URLs: it takes the bytes with a PUT carrying the URL's signature
    and serves them back as files. Like a real signed-URL host it refuses a PUT that also sends credentials."""

    def __init__(self) -> None:
        self.url = ""  # set once served
        self.upload_error: int | None = None
        self.uploads: list[StorageUpload] = []
        self.files: dict[str, bytes] = {}
        self._signatures: dict[str, str] = {}
        self.app = self._build()

    def reset(self, upload_error: int | None = None) -> None:
        self.upload_error = upload_error
        self.uploads = []
        self.files = {}
        self._signatures = {}

    def sign(self, name: str) -> tuple[str, str]:
        """A signed upload URL for `name`, and the URL the file is read from once uploaded."""
        signature = secrets.token_hex(8)
        self._signatures[name] = signature
        return f"{self.url}/upload/{name}?signature={signature}", f"{self.url}/files/{name}"

    def read(self, file_url: str) -> bytes:
        assert file_url.startswith(f"{self.url}/files/"), file_url
        return self.files[file_url.rpartition("/")[2]]

    def _build(self) -> FastAPI:
        app = FastAPI()
        fake = self

        @app.put("/upload/{name}")
        async def upload(request: Request, name: str) -> JSONResponse:
            received = StorageUpload(
                name, request.headers.get("content-type"), request.headers.get("authorization"), await request.body()
            )
            fake.uploads.append(received)
            if request.query_params.get("signature") != fake._signatures.get(name):
                return JSONResponse({"detail": "signature does not match"}, status_code=403)
            if received.authorization is not None:
                return JSONResponse({"detail": "a signed URL takes no Authorization header"}, status_code=400)
            if fake.upload_error is not None:
                return JSONResponse({"detail": "storage is failing"}, status_code=fake.upload_error)
            fake.files[name] = received.data
            return JSONResponse({})

        @app.get("/files/{name}")
        async def files(name: str) -> Response:
            return Response(fake.files[name], media_type="application/octet-stream")

        return app


@dataclass
class FalBehaviour:
    queued_polls: int = 1  # IN_QUEUE answers before IN_PROGRESS
    running_polls: int = 1  # IN_PROGRESS answers before COMPLETED
    never_finish: bool = False
    flaky_status_polls: int = 0  # the first status polls of each request answer 503
    submit_error: tuple[int, Any] | None = None
    result_error: tuple[int, Any] | None = None
    initiate_error: tuple[int, Any] | None = None  # fal storage's upload initiate
    upload_error: int | None = None  # the PUT to the signed upload URL
    output: Literal["image", "images", "url-strings", "data-uri"] = "image"


@dataclass
class FalRequest:
    id: str
    app_id: str
    input: dict[str, Any]
    authorization: str | None
    polls: int = 0
    cancelled: bool = False


class FakeFal:
    def __init__(self) -> None:
        self.url = ""  # set once served
        self.behaviour = FalBehaviour()
        self.submits: list[FalRequest] = []
        self.files: dict[str, bytes] = {}
        self.initiates: list[StorageInitiate] = []
        self.storage = FakeSignedStorage()
        self.lock = threading.Lock()
        self._ids = itertools.count(1)
        self.app = self._build()

    def reset(self, **behaviour: Any) -> None:
        with self.lock:
            self.behaviour = FalBehaviour(**behaviour)
            self.submits = []
            self.files = {}
            self.initiates = []
            self.storage.reset(self.behaviour.upload_error)

    @property
    def cancelled(self) -> list[str]:
        return [request.id for request in self.submits if request.cancelled]

    def _find(self, request_id: str) -> FalRequest | None:
        return next((request for request in self.submits if request.id == request_id), None)

    def _output(self, request: FalRequest, base: str) -> dict[str, Any]:
        # Each app has its own name for the scale; the ones without any upscale by 4.
        scale = next((request.input[key] for key in _FAL_SCALE_FIELDS if key in request.input), 4)
        image_url = request.input["image_url"]
        image = _from_data_uri(image_url) if image_url.startswith("data:") else self.storage.read(image_url)
        png = _upscaled_png(image, float(scale))
        name = f"{request.id}.png"
        self.files[name] = png
        url = f"{base}/files/{name}"
        style = self.behaviour.output
        if style == "data-uri":
            url = "data:image/png;base64," + base64.b64encode(png).decode()
        if style == "url-strings":
            return {"images": [url]}
        described = {"url": url, "content_type": "image/png", "file_name": name}
        return {"images": [described]} if style == "images" else {"image": described, "seed": 7}

    def _build(self) -> FastAPI:
        app = FastAPI()
        fake = self
        prefix = "/queue-v9/{owner}/{alias}/requests/{request_id}"

        def unauthorized(request: Request) -> JSONResponse | None:
            if request.headers.get("authorization") != f"Key {FAL_KEY}":
                return JSONResponse({"detail": "Invalid credentials"}, status_code=401)
            return None

        @app.get(prefix + "/status")
        async def status(request: Request, request_id: str) -> JSONResponse:
            if (denied := unauthorized(request)) is not None:
                return denied
            queued = fake._find(request_id)
            if queued is None:
                return JSONResponse({"detail": "Request not found"}, status_code=404)
            queued.polls += 1
            behaviour = fake.behaviour
            if queued.polls <= behaviour.flaky_status_polls:
                return JSONResponse({"detail": "upstream connect error"}, status_code=503)
            polls = queued.polls - behaviour.flaky_status_polls
            if behaviour.never_finish or polls <= behaviour.queued_polls + behaviour.running_polls:
                if polls <= behaviour.queued_polls:
                    return JSONResponse({"status": "IN_QUEUE", "queue_position": 2}, status_code=202)
                return JSONResponse({"status": "IN_PROGRESS", "logs": None}, status_code=202)
            return JSONResponse({"status": "COMPLETED", "logs": None, "metrics": {"inference_time": 0.1}})

        @app.get(prefix)
        async def result(request: Request, request_id: str) -> JSONResponse:
            if (denied := unauthorized(request)) is not None:
                return denied
            queued = fake._find(request_id)
            if queued is None:
                return JSONResponse({"detail": "Request not found"}, status_code=404)
            if fake.behaviour.result_error is not None:
                status_code, body = fake.behaviour.result_error
                # fal names its infrastructure errors in a header too.
                headers = {"X-Fal-Error-Type": body["error_type"]} if "error_type" in body else None
                return JSONResponse(body, status_code=status_code, headers=headers)
            return JSONResponse(fake._output(queued, str(request.base_url).rstrip("/")))

        @app.put(prefix + "/cancel")
        async def cancel(request: Request, request_id: str) -> JSONResponse:
            if (denied := unauthorized(request)) is not None:
                return denied
            queued = fake._find(request_id)
            if queued is None:
                return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
            queued.cancelled = True
            return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

        @app.get("/files/{name}")
        async def files(name: str) -> Response:
            return Response(fake.files[name], media_type="image/png")

        @app.post("/storage/upload/initiate")
        async def initiate(request: Request) -> JSONResponse:
            body = await request.json()
            with fake.lock:
                fake.initiates.append(StorageInitiate(dict(request.query_params), body,
                                                      request.headers.get("authorization")))
                name = f"{len(fake.initiates)}-{body['file_name']}"
            if (denied := unauthorized(request)) is not None:
                return denied
            if fake.behaviour.initiate_error is not None:
                status_code, error = fake.behaviour.initiate_error
                return JSONResponse(error, status_code=status_code)
            upload_url, file_url = fake.storage.sign(name)
            return JSONResponse({"upload_url": upload_url, "file_url": file_url})

        @app.post("/{app_id:path}")
        async def submit(request: Request, app_id: str) -> JSONResponse:
            body = await request.json()
            with fake.lock:
                queued = FalRequest(f"req-{next(fake._ids)}", app_id, body, request.headers.get("authorization"))
                fake.submits.append(queued)
            if (denied := unauthorized(request)) is not None:
                return denied
            if fake.behaviour.submit_error is not None:
                status_code, error = fake.behaviour.submit_error
                return JSONResponse(error, status_code=status_code)
            owner, alias = app_id.split("/")[:2]
            base = f"{str(request.base_url).rstrip('/')}/queue-v9/{owner}/{alias}/requests/{queued.id}"
            return JSONResponse({
                "status": "IN_QUEUE",
                "request_id": queued.id,
                "gateway_request_id": queued.id,
                "queue_position": 0,
                "status_url": f"{base}/status",
                "response_url": base,
                "cancel_url": f"{base}/cancel",
            })

        return app


@dataclass
class GatewayBehaviour:
    error: tuple[int, Any] | None = None
    output: Literal["b64_json", "url"] = "b64_json"
    delay_s: float = 0.0


@dataclass
class GatewayCall:
    fields: dict[str, str]
    query: dict[str, str]
    authorization: str | None
    filename: str | None
    content_type: str | None
    image: bytes


class FakeGateway:
    def __init__(self) -> None:
        self.url = ""  # set once served
        self.behaviour = GatewayBehaviour()
        self.calls: list[GatewayCall] = []
        self.media: dict[str, bytes] = {}
        self.app = self._build()

    def reset(self, **behaviour: Any) -> None:
        self.behaviour = GatewayBehaviour(**behaviour)
        self.calls = []
        self.media = {}

    def _build(self) -> FastAPI:
        app = FastAPI()
        fake = self

        @app.post("/v1/images/edits")
        async def edits(request: Request) -> JSONResponse:
            form = await request.form()
            upload = form["image"]
            assert not isinstance(upload, str)
            call = GatewayCall(
                fields={key: value for key, value in form.multi_items() if isinstance(value, str)},
                query=dict(request.query_params),
                authorization=request.headers.get("authorization"),
                filename=upload.filename,
                content_type=upload.content_type,
                image=await upload.read(),
            )
            fake.calls.append(call)
            await asyncio.sleep(fake.behaviour.delay_s)
            if call.authorization != f"Bearer {GATEWAY_KEY}":
                return JSONResponse({"error": {"message": "Invalid API key", "type": "authentication_error",
                                               "code": "AUTHENTICATION_FAILED"}}, status_code=401)
            if fake.behaviour.error is not None:
                status_code, body = fake.behaviour.error
                return JSONResponse(body, status_code=status_code)
            n = int(call.fields.get("n", "1"))
            if call.query.get("dryRun") == "true":
                return JSONResponse({
                    "estimated": True, "model": call.fields["model"], "provider": "fal",
                    "total_cost_micros": 16000 * n, "currency": "USD",
                    "components": [{"type": "output", "metric": "image", "quantity": n, "billable_quantity": n,
                                    "unit_price": 0.016, "total_cost": 16000 * n}],
                })
            png = _upscaled_png(call.image, float(call.fields["scale_factor"]))
            data = []
            for i in range(n):
                if fake.behaviour.output == "url":
                    name = f"{len(fake.media)}-{i}.png"
                    fake.media[name] = png
                    data.append({"url": f"{str(request.base_url).rstrip('/')}/v1/media/{name}"})
                else:
                    data.append({"b64_json": base64.b64encode(png).decode()})
            with Image.open(io.BytesIO(png)) as picture:
                size = f"{picture.width}x{picture.height}"
            return JSONResponse({
                "created": 1_700_000_000,
                "size": size,
                "data": data,
                "metadata": {"model": call.fields["model"], "executed_model": "fal/clarityai/crystal-upscaler",
                             "provider": "fal", "provider_name": "fal.ai", "cost": 0.016 * n, "cost_currency": "USD"},
            })

        @app.get("/v1/media/{name}")
        async def media(request: Request, name: str) -> Response:
            if request.headers.get("authorization") != f"Bearer {GATEWAY_KEY}":
                return JSONResponse({"error": {"message": "Invalid API key"}}, status_code=401)
            return Response(fake.media[name], media_type="image/png")

        return app
