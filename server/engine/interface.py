"""The `Engine` protocol: what serving needs from whatever runs local jobs.

`LocalEngine` (runtime.py) is the engine of a server; tests serve the same app over a fake one,
and a cluster can put its own behind it. Serving never sees devices, models, tiles or pixels: it asks
for a reservation from the picture's header, then for the job's plan (the dry run) or its results. A
job goes in with the client's encoded image and its results come back encoded, so an engine in another
process (or on another machine) is sent files, never decoded pixels.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from server.catalog import ModelEntry
from server.engine.custom import CustomModel
from server.engine.planning import PictureFacts
from server.engine.precision import Execution
from server.jobs import Job

Progress = Callable[[int, int], None]  # (tiles done, tiles in all)


class Reservation(Protocol):
    """A job's place in an engine's queue budget; released when the job ends (and by `release`, idempotently)."""

    def release(self) -> None: ...


class Plan(Protocol):
    """A job's plan, as the dry run shows it."""

    @property
    def executed_model(self) -> str: ...

    def describe(self) -> dict[str, Any]:
        """The dry run's `plan`."""
        ...


@dataclass(frozen=True)
class Upscaled:
    """A job's results, encoded in the job's output format: a deterministic model's `n` copies are one object."""

    images: list[bytes]
    size: tuple[int, int]  # of each image
    executed_model: str


class Engine(Protocol):
    device_name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def find(self, name: str) -> ModelEntry | None:
        """The model `name` as this engine knows it: the catalog's, or its own (custom files, once read)."""
        ...

    async def custom_models(self, wait_s: float) -> list[CustomModel]:
        """The models beyond the catalog this engine offers, runnable or not; a file still being read after
        `wait_s` is listed as such."""
        ...

    def unavailable_reason(self, entry: ModelEntry) -> str | None:
        """None when `entry` can run here now; else why not, and what fixes it."""
        ...

    def execution(self, entry: ModelEntry) -> Execution: ...

    def reserve(self, entry: ModelEntry, picture: PictureFacts, target: tuple[int, int], n: int = 1) -> Reservation:
        """A place for the job, from its header's facts; raises QueueFull when the budget is spent."""
        ...

    async def plan_job(self, job: Job) -> Plan:
        """The plan the job would run (the dry run), from its decoded picture."""
        ...

    async def run(self, job: Job, *, reservation: Any = None, progress: Progress | None = None,
                  cancel: threading.Event | None = None) -> Upscaled:
        """The job's `n` results, run as one job on the reservation's place. `progress` gets (0, tiles in all) as a
        device takes the job, then (tiles done, tiles in all). Cancelling the awaiting task or setting `cancel`
        stops it while it is queued or between tiles (not inside a decode or an encode)."""
        ...

    def stats(self) -> dict[str, float | int | None]: ...
