"""Domain errors to HTTP, in one table: status, OpenAI error type, retryability, headers.

The openai SDK retries 5xx, 408, 409 and 429 unless told not to: every error that would
fail again the same way carries `x-should-retry: false`, and every one that clears by itself
`x-should-retry: true` with a `Retry-After`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from server.errors import (
    AuthenticationFailed,
    Busy,
    Cancelled,
    Conflict,
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    LoupeError,
    NotFound,
    ShuttingDown,
    StorageFull,
    TooLarge,
    Unavailable,
    UnsupportedMediaType,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    without_paths,
)


class ProtocolError(InvalidInput):
    """A fault in the HTTP request itself (its URL, headers or method), with HTTP's own status for it."""

    def __init__(self, status: int, message: str, *, code: str) -> None:
        super().__init__(message, code=code)
        self.status = status


@dataclass(frozen=True)
class HttpShape:
    status: int | None  # None: the error's own `status` (relayed from upstream, or HTTP's)
    retryable: bool | None  # None: the error's own `transient`


# Most specific first is not needed: lookup walks each error's class hierarchy.
HTTP_SHAPES: dict[type[LoupeError], HttpShape] = {
    ProtocolError: HttpShape(None, False),
    UpstreamRejected: HttpShape(None, None),
    TooLarge: HttpShape(413, False),
    UnsupportedMediaType: HttpShape(415, False),
    InvalidInput: HttpShape(400, False),
    AuthenticationFailed: HttpShape(401, False),
    NotFound: HttpShape(404, False),
    Conflict: HttpShape(409, False),
    Busy: HttpShape(429, True),
    Cancelled: HttpShape(499, False),
    InternalError: HttpShape(500, False),
    UpstreamTimeout: HttpShape(504, None),
    UpstreamFailed: HttpShape(502, None),
    Unavailable: HttpShape(503, None),
    DeadlineExceeded: HttpShape(504, False),
    StorageFull: HttpShape(507, False),
}


def http_shape(error: LoupeError) -> HttpShape:
    return next(HTTP_SHAPES[kind] for kind in type(error).__mro__ if kind in HTTP_SHAPES)


def status_of(error: LoupeError) -> int:
    shape = http_shape(error)
    return shape.status if shape.status is not None else int(getattr(error, "status"))


def retryable(error: LoupeError) -> bool:
    shape = http_shape(error)
    return shape.retryable if shape.retryable is not None else error.transient


def error_type(error: LoupeError, status: int) -> str:
    if isinstance(error, AuthenticationFailed):
        return "authentication_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(error: LoupeError, request_id: str | None = None) -> JSONResponse:
    status = status_of(error)
    # Said either way: a failure that clears by itself says when to come back (a second, unless it knows better).
    retry = retryable(error)
    headers = {"x-should-retry": "true" if retry else "false"}
    if retry:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s or 1)))
    if isinstance(error, ShuttingDown):
        headers["Connection"] = "close"
    if request_id:
        headers["X-Request-Id"] = request_id
    return JSONResponse({"error": error_object(error)}, status_code=status, headers=headers)


def error_object(error: BaseException) -> dict[str, str | None]:
    """The OpenAI error object for any failure: a domain error's own, or a generic server error."""
    if not isinstance(error, LoupeError):
        error = InternalError("internal error; the server log has the details")
    return {"message": without_paths(error.message), "type": error_type(error, status_of(error)),
            "param": error.param, "code": error.code}
