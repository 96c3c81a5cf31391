"""The one error type the server raises for anything a client should be told about.

It carries the OpenAI error shape (`message`, `type`, `param`, `code`) and whether
retrying the same request could help; the HTTP layer turns it into a response.
"""
from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        retryable: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _DEFAULT_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "INVALID_REQUEST")
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        # 429 and most 5xx are worth retrying; a 4xx would fail the same way again.
        self.retryable = retryable if retryable is not None else status in (408, 429, 502, 503, 504)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_DEFAULT_CODES = {
    400: "INVALID_REQUEST",
    401: "AUTHENTICATION_FAILED",
    402: "INSUFFICIENT_BALANCE",
    404: "MODEL_NOT_FOUND",
    408: "REQUEST_TIMEOUT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "INVALID_REQUEST",
    429: "RATE_LIMITED",
    502: "ALL_PROVIDERS_EXHAUSTED",
    503: "SERVICE_UNAVAILABLE",
    504: "UPSTREAM_TIMEOUT",
}


def invalid(message: str, param: str | None = None, *, code: str | None = None) -> ApiError:
    """A 400 for a request that will fail the same way every time."""
    return ApiError(400, message, param=param, code=code)
