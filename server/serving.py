"""Serving logic for image edits: a Job in, a response model out.

Knows the route (local engine or remote provider), the result encoding and the
progress reports; knows nothing of HTTP forms.
"""
from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server import imaging
from server.api.protocol import CostComponent, DryRunResponse, ImagesResponse, Metadata
from server.config import Settings
from server.engine.pipeline import plan_passes
from server.engine.runtime import LocalEngine
from server.jobs import Job
from server.progress import ProgressHub
from server.remote import RemoteProviders
from server.results import Published, publish_pictures, publish_remote
from server.routing import Route, choose_route
from server.storage import ResultStore


@dataclass
class Services:
    """Everything a request may use; built once per app in its lifespan."""

    settings: Settings
    engine: LocalEngine
    providers: RemoteProviders
    store: ResultStore
    progress: ProgressHub


def local_executed_model(job: Job) -> str:
    assert job.entry.local is not None
    weights = job.entry.local.weights
    scale = max(job.target[0] / job.image.width, job.target[1] / job.image.height)
    return "local/" + "+".join(weights[p] for p in plan_passes(scale, job.entry.local.native_scales))


def _cost(job: Job, route: Route, size: tuple[int, int]) -> float:
    if route.local or job.entry.price is None:
        return 0.0
    return round(job.entry.price.cost(size[0] * size[1]) * job.n, 6)


async def run(job: Job, services: Services, cancel: threading.Event, base_url: str) -> ImagesResponse:
    """Run the job and publish its images; `base_url` is where result URLs point."""
    route = choose_route(job, services.settings, services.engine, services.providers)
    services.progress.update(job.request_id, "queued")
    if route.local:
        published, metadata = await _run_local(job, services, cancel, base_url)
    else:
        published, metadata = await _run_remote(job, services, route, base_url)
    services.progress.update(job.request_id, "done")
    return ImagesResponse(
        created=int(time.time()),
        size=f"{published.size[0]}x{published.size[1]}",
        data=published.items,
        metadata=metadata,
    )


async def _run_local(job: Job, services: Services, cancel: threading.Event, base_url: str) -> tuple[Published, Metadata]:
    engine, settings = services.engine, services.settings
    picture = await asyncio.to_thread(imaging.decode, job.image.data, max_pixels=settings.max_input_pixels)
    report = services.progress.tile_reporter(job.request_id)
    stochastic = job.entry.local is not None and job.entry.local.family == "aura"
    if stochastic:
        first_seed = job.seed if job.seed is not None else secrets.randbits(63)
        seeds = [first_seed + i for i in range(job.n)]
        pictures = [
            await engine.upscale(job.entry, picture, job.target, seed=seed,
                                 progress=_part_of(report, index, job.n), cancel=cancel)
            for index, seed in enumerate(seeds)
        ]
    else:
        result = await engine.upscale(job.entry, picture, job.target, seed=job.seed, progress=report, cancel=cancel)
        pictures = [result] * job.n
    services.progress.update(job.request_id, "encoding")
    published = await publish_pictures(pictures, job, services.store, base_url)
    metadata = Metadata(
        model=job.requested_model,
        executed_model=local_executed_model(job),
        provider="local",
        provider_name=f"Loupe ({engine.device_name})",
        cost=0.0,
    )
    return published, metadata


def _part_of(report: Callable[[int, int], None], index: int, count: int) -> Callable[[int, int], None]:
    """Progress of the index-th of `count` equal runs, reported as progress of the whole."""
    return lambda done, total: report(index * total + done, count * total)


async def _run_remote(job: Job, services: Services, route: Route, base_url: str) -> tuple[Published, Metadata]:
    assert route.provider is not None
    services.progress.update(job.request_id, "running", 0, job.n)
    result = await route.provider.upscale(job)
    services.progress.update(job.request_id, "encoding", job.n, job.n)
    settings = services.settings
    # Loupe converts pictures as large as it takes in or makes itself.
    convertible = max(settings.max_input_pixels, settings.max_output_side**2)
    published = await publish_remote([image.data for image in result.images], job, services.store, base_url,
                                     convertible)
    metadata = Metadata(
        model=job.requested_model,
        executed_model=result.executed_model,
        provider=result.provider,
        provider_name=result.provider_name,
        cost=result.cost if result.cost is not None else _cost(job, route, published.size),
    )
    return published, metadata


async def dry_run(job: Job, services: Services) -> DryRunResponse:
    route = choose_route(job, services.settings, services.engine, services.providers)
    size = f"{job.target[0]}x{job.target[1]}"
    if route.local:
        plan = services.engine.plan(job.entry, (job.image.width, job.image.height), job.target, channels=3)
        return DryRunResponse(
            model=job.requested_model,
            provider="local",
            total_cost_micros=0,
            components=[CostComponent(type="output", metric="image", quantity=job.n, billable_quantity=job.n,
                                      unit_price=0.0, total_cost=0)],
            size=size,
            executed_model=local_executed_model(job),
            plan=plan,
        )
    assert route.provider is not None
    upstream = await route.provider.dry_run(job)
    return DryRunResponse.model_validate({"size": size, "executed_model": upstream.get("executed_model", job.requested_model),
                                          **upstream, "plan": {"route": route.provider.name, "why": route.why}})
