"""Cross-cutting HTTP concerns: request ids, body-size caps, API keys, errors in OpenAI's shape."""
from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ProtocolError, error_response
from server.errors import Cancelled, InternalError, InvalidInput, LoupeError, ShuttingDown, TooLarge
from server.metrics import Metrics
from server.logs import request_id_var

log = logging.getLogger("loupe.http")
access_log = logging.getLogger("loupe.access")
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


class RequestIdMiddleware:
    """Give every request an id (the client's `X-Request-Id` when well-formed), echoed on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _CLIENT_REQUEST_ID.match(incoming) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                if all(name.lower() != b"x-request-id" for name, _ in headers):  # an error response has it already
                    headers.append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class BodyTooLarge(Exception):
    pass


MAX_URL_BYTES = 8 * 1024
MAX_HEADER_BYTES = 32 * 1024


class RequestLimitsMiddleware:
    """Refuse over-long URLs and headers, and bodies over the cap while they stream in, before anything reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = scope.get("state", {}).get("request_id")
        refusal = self._oversized_head(scope)
        if refusal is not None:
            await error_response(refusal, request_id)(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._too_large(), request_id)(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await error_response(self._too_large(), request_id)(scope, receive, send)

    @staticmethod
    def _oversized_head(scope: Scope) -> ProtocolError | None:
        if len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b"")) > MAX_URL_BYTES:
            return ProtocolError(414, f"the URL is over {MAX_URL_BYTES} bytes", code="URI_TOO_LONG")
        if sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
            return ProtocolError(431, f"the request headers are over {MAX_HEADER_BYTES} bytes",
                                 code="HEADERS_TOO_LARGE")
        return None

    def _too_large(self) -> TooLarge:
        return TooLarge(f"the request body is over {self.max_bytes} bytes (LOUPE_MAX_UPLOAD_BYTES as base64, plus form overhead)",
                        "image")


def install_error_handlers(app: FastAPI) -> None:
    def request_id(request: Request) -> str | None:
        return getattr(request.state, "request_id", None)

    @app.exception_handler(LoupeError)
    async def on_domain_error(request: Request, error: LoupeError) -> JSONResponse:
        return error_response(error, request_id(request))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = error.errors()[0] if error.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = loc[0] if loc else None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
        return error_response(InvalidInput(message, param), request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(error.status_code, "INVALID_REQUEST")
        return error_response(ProtocolError(error.status_code, str(error.detail), code=code), request_id(request))

    @app.exception_handler(ClientDisconnect)
    async def on_client_gone(request: Request, error: ClientDisconnect) -> JSONResponse:
        # Nobody reads this answer; it only keeps a vanished client out of the error log.
        return error_response(Cancelled("the client closed the request", code="CLIENT_CLOSED"), request_id(request))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette runs this after the middleware stack has unwound, so the request id is given here.
        log.exception("unhandled error", extra={"request_id": request_id(request)})
        return error_response(InternalError("internal error; the server log has the details"), request_id(request))


class Admission:
    """Whether the server takes new requests, and how many are in flight (for a graceful shutdown)."""

    def __init__(self) -> None:
        self.draining = False
        self.active = 0


_ALWAYS_ANSWERED = ("/healthz", "/readyz", "/metrics")


class AdmissionMiddleware:
    """While draining, new requests get 503 and in-flight ones finish."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _ALWAYS_ANSWERED:
            await self.app(scope, receive, send)
            return
        if self.admission.draining:
            error = ShuttingDown("the server is shutting down; retry on another instance or shortly")
            await error_response(error, scope.get("state", {}).get("request_id"))(scope, receive, send)
            return
        self.admission.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.active -= 1


class AccessLogMiddleware:
    """One JSON log line per request, and the request metrics for image edits."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            seconds = time.perf_counter() - started
            state = scope.get("state", {})
            model, provider = state.get("model_label", "-"), state.get("provider", "-")
            if scope["path"].endswith("/images/edits"):
                self.metrics.observe_request(model, provider, status, seconds)
            if scope["path"] not in _ALWAYS_ANSWERED:
                access_log.info("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                                  "seconds": round(seconds, 4), "model": model, "provider": provider})
