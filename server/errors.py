"""What can go wrong, in the engine's and the providers' words: the domain errors a client is told about.

Each class names a fault and carries its facts (a message, the request field at fault, a code,
whether retrying could help, when to retry). None of them knows HTTP: `server/api/errors.py`
maps each class to a status in one table.
"""
from __future__ import annotations

import re
from typing import ClassVar

# An absolute file path's folders: "/", then names ending in "/", where a path starts (not inside a URL or a
# word), unless it is one of Loupe's own routes (/v1/models, /results/…).
_FOLDERS = re.compile(r"(?<![\w.:/~-])/(?!v1/|openai/|results/)(?:[^\s/'\"`()\[\]]+/)+")


def without_paths(text: str) -> str:
    """`text` with the folders of every absolute path dropped (`/srv/loupe/weights/x.pth` → `x.pth`): what a
    client reads never shows the server's own layout."""
    return _FOLDERS.sub("", text)


class LoupeError(Exception):
    code: ClassVar[str] = "INVALID_REQUEST"

    def __init__(self, message: str, param: str | None = None, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or type(self).code
        self.transient = False  # whether the same request may succeed later (where the HTTP table asks)
        self.retry_after_s: float | None = None

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt from its facts, not by calling the constructor (whose arguments differ by class): an error
        # raised on a Ray replica reaches the ingress whole.
        return _rebuild, (type(self), self.message, self.__dict__)


def _rebuild(cls: type[LoupeError], message: str, facts: dict[str, object]) -> LoupeError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(facts)
    return error


class InvalidInput(LoupeError):
    """The request is wrong and would fail the same way every time."""


class TooLarge(InvalidInput):
    code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(InvalidInput):
    code = "UNSUPPORTED_MEDIA_TYPE"


class NotFound(LoupeError):
    code = "NOT_FOUND"


class AuthenticationFailed(LoupeError):
    code = "AUTHENTICATION_FAILED"


class Conflict(LoupeError):
    code = "CONFLICT"


class Busy(LoupeError):
    """Too much at once; the same request can succeed after `retry_after_s`."""

    code = "RATE_LIMITED"

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class QueueFull(Busy):
    """A device's queued work is past its budget (LOUPE_MAX_QUEUE_S)."""


class RateLimited(Busy):
    """A client is past its request rate (LOUPE_RATE_LIMIT)."""


class Unavailable(LoupeError):
    """Something the request needs can't serve it now; `transient` says whether that will pass by itself."""

    code = "SERVICE_UNAVAILABLE"

    def __init__(self, message: str, param: str | None = None, *, code: str | None = None,
                 transient: bool = True, retry_after_s: float | None = None) -> None:
        super().__init__(message, param, code=code)
        self.transient = transient
        self.retry_after_s = retry_after_s


class ModelUnavailable(Unavailable):
    """The model can't run here: its weights are missing or broken, or no provider that serves it is set up."""

    code = "MODEL_UNAVAILABLE"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, "model", code=code, transient=False)


class OutOfDeviceMemory(Unavailable):
    code = "DEVICE_OUT_OF_MEMORY"


class ShuttingDown(Unavailable):
    code = "SHUTTING_DOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=5)


class RecordsBusy(Unavailable):
    """The request database stayed locked (another process holds it) past what the request could wait: it clears
    by itself."""

    code = "DATABASE_BUSY"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=2)


class ProviderUnavailable(Unavailable):
    """A provider's circuit breaker is open."""

    code = "PROVIDER_UNAVAILABLE"


class Cancelled(LoupeError):
    """The job's client went away, or its request timed out."""

    code = "CANCELLED"


class DeadlineExceeded(LoupeError):
    """The request ran past LOUPE_REQUEST_TIMEOUT_S."""

    code = "REQUEST_TIMEOUT"


class UpstreamFailed(LoupeError):
    """A remote provider failed us (down, broken, or refusing this server); `transient`: a retry may succeed."""

    code = "UPSTREAM_ERROR"

    def __init__(self, message: str, *, code: str | None = None, transient: bool = True) -> None:
        super().__init__(message, code=code)
        self.transient = transient


class UpstreamTimeout(UpstreamFailed):
    code = "UPSTREAM_TIMEOUT"


class UpstreamRejected(LoupeError):
    """A remote provider refused the client's request as invalid, with its own 4xx status, which is relayed."""

    _CODES: ClassVar[dict[int, str]] = {404: "NOT_FOUND", 408: "REQUEST_TIMEOUT", 413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE",
              429: "RATE_LIMITED"}

    def __init__(self, status: int, message: str, param: str | None = None, *, code: str | None = None) -> None:
        super().__init__(message, param, code=code or self._CODES.get(status))
        self.status = status
        self.transient = status in (408, 429)  # the provider was busy, not the request wrong


class StorageFull(LoupeError):
    code = "STORAGE_UNAVAILABLE"


class InternalError(LoupeError):
    """The server itself failed in a way no retry of this request would fix (say, a disk that refuses writes)."""

    code = "INTERNAL_ERROR"


class WeightsError(Exception):
    """A weight could not be found, fetched, converted or verified (the `loupe weights` commands); the message says
    why. Not a request's error: it never reaches HTTP."""
