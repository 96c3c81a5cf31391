"""The Serve application: an ingress that is Loupe's unchanged app, and Upscaler replicas that own one engine each.

    HTTP ─► Serve proxy ─► LoupeIngress (create_app over a RayEngine: forms, guards, routing, results, progress)
                                 └─ handle, stream ─► Upscaler × N (one LocalEngine on one device)

A job travels to an Upscaler as the client's encoded image and comes back as encoded results (never as pixels),
with its tile progress streamed before it. An Upscaler holds two jobs (one on its device, the other decoding or
encoding beside it); the ingress's handle holds up to LOUPE_RAY_QUEUE more, and past that Serve refuses the job,
which becomes a 429.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from server.cluster.layout import Layout, use_actor_cpus
from server.config import Settings
from server.engine.interface import Upscaled
from server.engine.precision import has_native_bf16
from server.engine.runtime import LocalEngine
from server.jobs import Job
from server.logs import configure_logging_for

APP = "loupe"
UPSCALER = "Upscaler"
INGRESS = "LoupeIngress"
_INGRESS_CONCURRENCY = 1000  # HTTP requests in the ingress at once: uploads, progress streams and result files too


@dataclass(frozen=True)
class ReplicaFacts:
    """What the ingress needs to know of the replicas' device to answer for them."""

    device_name: str  # "CPU", "NVIDIA H200"
    device_type: str  # "cpu", "cuda"
    native_bf16: bool


@dataclass(frozen=True)
class DescribedPlan:
    """A replica's plan of a job, as the dry run shows it (the plan itself holds the replica's device)."""

    executed_model: str
    plan: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return self.plan


@dataclass(frozen=True)
class Finished:
    """A job's results, and the counters of the replica that ran it (for the ingress's /metrics)."""

    upscaled: Upscaled
    replica: str
    stats: dict[str, float | int | None]


class Upscaler:
    """One LocalEngine on this replica's device: Ray hands a GPU replica its GPU as CUDA_VISIBLE_DEVICES."""

    async def __init__(self) -> None:
        use_actor_cpus()
        settings = Settings()
        configure_logging_for(settings)
        self.engine = LocalEngine(settings)
        await self.engine.start()

    def describe(self) -> ReplicaFacts:
        device = self.engine.devices[0]
        return ReplicaFacts(self.engine.device_name, device.type, has_native_bf16(device))

    async def plan_job(self, job: Job) -> DescribedPlan:
        plan = await self.engine.plan_job(job)
        return DescribedPlan(plan.executed_model, plan.describe())

    async def run(self, job: Job) -> AsyncIterator[tuple[int, int] | Finished]:
        """Yields (tiles done, tiles in all) as the job runs, then its results. Cancelling the stream (the
        client went away) stops the job at its next tile."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        def report(done: int, total: int) -> None:  # on the device's thread
            loop.call_soon_threadsafe(updates.put_nowait, (done, total))

        work = asyncio.ensure_future(self.engine.run(job, progress=report))
        try:
            while not work.done():
                update = asyncio.ensure_future(updates.get())
                await asyncio.wait({work, update}, return_when=asyncio.FIRST_COMPLETED)
                if not update.done():
                    update.cancel()
                    continue
                latest = update.result()
                while not updates.empty():  # only the newest count matters
                    latest = updates.get_nowait()
                yield latest
            replica = serve.get_replica_context().replica_id.unique_id
            yield Finished(work.result(), replica, self.engine.stats())
        finally:
            work.cancel()


def _ingress_app() -> FastAPI:
    """Built on the ingress replica, so that its settings are read there."""
    from server.app import create_app
    from server.cluster.engine import RayEngine

    settings = Settings()
    configure_logging_for(settings)
    return create_app(settings, engine_factory=RayEngine)


def application(settings: Settings, layout: Layout, env: dict[str, str]) -> Application:
    upscaler = serve.deployment(Upscaler, name=UPSCALER).options(**layout.serve_options(settings, env))
    ingress = serve.deployment(serve.ingress(_ingress_app)(), name=INGRESS).options(
        num_replicas=1, max_ongoing_requests=_INGRESS_CONCURRENCY,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}},
        graceful_shutdown_timeout_s=math.ceil(settings.request_timeout_s))
    return ingress.bind(upscaler.bind())
