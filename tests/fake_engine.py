"""An `Engine` without models, for tests of everything around the engine: it resamples with Lanczos.

It runs the real app (routing, fallback, limits, errors, metrics, progress) in milliseconds. A test
can make it refuse (`busy`, or `refused_runs` as they start), fail (`fail_with`), hold jobs until released (`gate`), or lack a model's
weights (`missing`), and it counts what it was asked to do.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from server import catalog, imagework
from server.catalog import ModelEntry
from server.config import Settings
from server.engine.interface import Upscaled
from server.engine.planning import PictureFacts
from server.engine.precision import Execution
from server.errors import Cancelled, QueueFull
from server.imaging import Picture, resize
from server.jobs import Job


@dataclass
class FakeReservation:
    released: bool = False

    def release(self) -> None:
        self.released = True


@dataclass(frozen=True)
class FakePlan:
    model: str
    target: tuple[int, int]
    images: int

    @property
    def executed_model(self) -> str:
        return f"fake/{self.model}"

    def describe(self) -> dict[str, Any]:
        return {"device": "fake", "images": self.images, "target": list(self.target)}


@dataclass
class FakeEngine:
    settings: Settings
    device_name: str = "Fake"
    missing: set[str] = field(default_factory=set)  # model ids whose weights are "not here"
    busy_for_s: float | None = None  # when set, every reservation is refused with this retry-after
    fail_with: BaseException | None = None  # raised by every run
    refused_runs: int = 0  # this many runs are refused as they start, as a cluster's full queue refuses them
    gate: threading.Event | None = None  # when set, runs wait for it
    reservations: list[FakeReservation] = field(default_factory=list)
    runs: int = 0
    started: threading.Event = field(default_factory=threading.Event)  # set as a run begins

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        if self.gate is not None:
            self.gate.set()

    async def find(self, name: str) -> ModelEntry | None:
        return catalog.find(name)

    async def custom_models(self, wait_s: float) -> list[Any]:
        return []

    def unavailable_reason(self, entry: ModelEntry) -> str | None:
        if entry.local is None:
            return f"{entry.id} has no local weights"
        return f"the weights of {entry.id} are missing (fake)" if entry.id in self.missing else None

    def execution(self, entry: ModelEntry) -> Execution:
        return Execution(torch.float32, False)

    def reserve(self, entry: ModelEntry, picture: PictureFacts, target: tuple[int, int],
                n: int = 1) -> FakeReservation:
        if self.busy_for_s is not None:
            raise QueueFull("the fake engine is busy", retry_after_s=self.busy_for_s)
        reservation = FakeReservation()
        self.reservations.append(reservation)
        return reservation

    async def plan_job(self, job: Job) -> FakePlan:
        assert job.entry.local is not None
        # The one model that samples noise makes n images; the others, one image n times.
        return FakePlan(job.entry.id, job.target, job.n if job.entry.id == "aura-sr" else 1)

    async def run(self, job: Job, *, reservation: Any = None, progress: Any = None,
                  cancel: threading.Event | None = None) -> Upscaled:
        if self.refused_runs > 0:
            self.refused_runs -= 1
            raise QueueFull("the fake cluster's queue is full", retry_after_s=0.05)
        plan = await self.plan_job(job)
        picture = imagework.decode(job.image, self.settings.max_input_pixels)
        self.runs += 1
        if progress is not None:
            progress(0, 1)  # as a device taking the job reports it
        self.started.set()
        if self.gate is not None:
            while not self.gate.is_set():
                if cancel is not None and cancel.is_set():  # as the real engine does, at its next tile
                    raise Cancelled("the run was cancelled")
                await asyncio.sleep(0.01)
        if self.fail_with is not None:
            raise self.fail_with
        if progress is not None:
            progress(1, 1)
        pictures = [Picture(resize(picture.pixels, *plan.target), picture.icc_profile) for _ in range(plan.images)]
        images = imagework.encode(pictures * (job.n // plan.images), job.output_format, job.output_compression)
        return Upscaled(images, plan.target, plan.executed_model)

    def stats(self) -> dict[str, float | int | None]:
        return {"queue_depth": sum(not r.released for r in self.reservations), "tiles_processed": self.runs}


