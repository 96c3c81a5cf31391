"""A circuit breaker: stop calling a provider that keeps failing, and try it again after a pause."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

from server.errors import LoupeError, ProviderUnavailable, UpstreamFailed

State = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    """Closed, calls go through. After `threshold` failures in a row it opens: calls
    fail at once with a 503 for `cooldown_s`. Then it is half-open: one probe call
    goes through, and its success closes the breaker while its failure opens it again.

    A failure is a call ending in `UpstreamFailed` (the provider is down, slow or
    refusing this server) or in an error Loupe did not foresee. Any other domain
    error means the provider answered (it rejected the request, say), so it counts
    as a success. A cancelled call counts as neither.
    """

    def __init__(
        self,
        provider_name: str,
        *,
        threshold: int = 5,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._name = provider_name
        self._threshold = threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self._cooldown_s:
            return "half-open"
        return "open"

    def allows(self) -> bool:
        state = self.state
        return state == "closed" or (state == "half-open" and not self._probing)

    @contextmanager
    def call(self) -> Iterator[None]:
        """Guard one upstream call: raises the 503 when the breaker refuses it, records the outcome otherwise."""
        probe = self._admit()
        succeeded: bool | None = None
        try:
            yield
            succeeded = True
        except UpstreamFailed:
            succeeded = False
            raise
        except LoupeError:
            succeeded = True
            raise
        except Exception:
            succeeded = False
            raise
        finally:
            if probe:
                self._probing = False
            if succeeded is True:
                self._failures = 0
                self._opened_at = None
            elif succeeded is False:
                self._failures += 1
                if probe or self._failures >= self._threshold:
                    self._opened_at = self._clock()

    def _admit(self) -> bool:
        """Let a call through, saying whether it is the half-open probe; or raise the 503."""
        state = self.state
        if state == "closed":
            return False
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        assert self._opened_at is not None
        wait_s = max(1, math.ceil(self._opened_at + self._cooldown_s - self._clock()))
        raise ProviderUnavailable(
            f"{self._name} failed {self._failures} times in a row, so Loupe stopped calling it for a while; "
            f"retry in about {wait_s} s",
            retry_after_s=wait_s,
        )
