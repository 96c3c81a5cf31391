"""Per-request admission for /v1: API keys and the per-key rate limit."""
from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from dataclasses import dataclass

from fastapi import Request

from server.config import Settings
from server.errors import AuthenticationFailed, RateLimited


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per API key (or per client address when keys are off): `rate` requests a second, bursts of `rate`."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()  # `admit` is a sync dependency: FastAPI calls it from worker threads

    def admit(self, who: str) -> None:
        with self._lock:
            now = time.monotonic()
            bucket = self._buckets.setdefault(who, _Bucket(self.capacity, now))
            bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens < 1:
                wait = math.ceil((1 - bucket.tokens) / self.rate)
                raise RateLimited(f"rate limit of {self.rate:g} requests per second exceeded; retry in {wait} s",
                                  retry_after_s=wait)
            bucket.tokens -= 1
            if len(self._buckets) > 10_000:
                self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.tokens + (now - b.updated) * self.rate >= self.capacity]:
            del self._buckets[key]


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def principal(request: Request) -> str | None:
    """Who sent an admitted request: a digest of its API key, or None when the server has no keys."""
    settings: Settings = request.app.state.services.settings
    token = _bearer(request)
    return hashlib.sha256(token.encode()).hexdigest() if settings.api_keys and token else None


def admit(request: Request) -> None:
    """The dependency every /v1 route has: a valid key when keys are set, then the rate limit."""
    settings: Settings = request.app.state.services.settings
    token = _bearer(request)
    if settings.api_keys and not (token and any(hmac.compare_digest(token, key) for key in settings.api_keys)):
        raise AuthenticationFailed("a valid API key is required: send `Authorization: Bearer <key>`")
    limiter: RateLimiter | None = request.app.state.rate_limiter
    if limiter is not None:
        client = request.client.host if request.client else "unknown"
        limiter.admit(f"key:{token}" if settings.api_keys else f"addr:{client}")
