"""Serving logic for image edits: a Job in, a response model out.

Knows the route (local engine or remote provider), the result encoding and the
progress reports; knows nothing of HTTP forms.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.api.protocol import CostComponent, DryRunResponse, ImagesResponse, Metadata
from server.api.tracking import Tracker
from server.config import Settings
from server.engine.interface import Engine, Reservation
from server.engine.planning import PictureFacts
from server.errors import QueueFull
from server.jobs import Job
from server.progress import Channel, ProgressHub
from server.remote import RemoteProviders
from server.results import Published, publish_local, publish_remote
from server.routing import Route, choose_route, overflow_route
from server.storage import ResultStore


@dataclass
class Services:
    """Everything a request may use; built once per app in its lifespan."""

    settings: Settings
    engine: Engine
    providers: RemoteProviders
    store: ResultStore
    progress: ProgressHub
    tracker: Tracker  # every request's record, and the async ones' background runs
    webhook_secret: str  # the master secret: each API key signs with its own (`webhooks.secret_for`)


async def run(job: Job, services: Services, channel: Channel, cancel: threading.Event, base_url: str,
              on_start: Callable[[], None] | None = None) -> ImagesResponse:
    """Run the job and publish its images, its progress reported on `channel`; `base_url` is where result URLs
    point. `on_start` is called (on the event loop) once a device or a provider takes the job."""
    route = choose_route(job, services.settings, services.engine, services.providers)
    channel.update("queued")
    reservation = None
    if route.local:
        try:
            reservation = services.engine.reserve(job.entry, _header_facts(job), job.target, job.n)
        except QueueFull:
            overflow = overflow_route(job, services.settings, services.providers)
            if overflow is None:
                raise
            route = overflow
    if reservation is not None:
        try:
            published, metadata = await _run_local(job, services, reservation, channel, cancel, base_url, on_start)
        except QueueFull:  # an engine that queues elsewhere (a cluster) may refuse the job only when it is sent
            overflow = overflow_route(job, services.settings, services.providers)
            if overflow is None:
                raise
            published, metadata = await _run_remote(job, services, overflow, channel, base_url, on_start)
        finally:
            reservation.release()
    else:
        published, metadata = await _run_remote(job, services, route, channel, base_url, on_start)
    channel.update("done")
    return ImagesResponse(
        created=int(time.time()),
        size=f"{published.size[0]}x{published.size[1]}",
        data=published.items,
        metadata=metadata,
    )


def _header_facts(job: Job) -> PictureFacts:
    return PictureFacts.from_header(job.image.width, job.image.height, job.image.alpha)


async def _run_local(job: Job, services: Services, reservation: Reservation, channel: Channel,
                     cancel: threading.Event, base_url: str,
                     on_start: Callable[[], None] | None) -> tuple[Published, Metadata]:
    """The job on the place `reservation` holds, taken before the picture is decoded; the engine's first progress
    report (as its device takes the job) is its start."""
    engine = services.engine
    upscaled = await engine.run(job, reservation=reservation, progress=channel.reporter(on_start), cancel=cancel)
    channel.update("encoding")
    published = await publish_local(upscaled.images, upscaled.size, job, services.store, base_url)
    metadata = Metadata(
        model=job.requested_model,
        executed_model=upscaled.executed_model,
        provider="local",
        provider_name=f"Loupe ({engine.device_name})",
        cost=0.0,
    )
    return published, metadata


async def _run_remote(job: Job, services: Services, route: Route, channel: Channel, base_url: str,
                      on_start: Callable[[], None] | None) -> tuple[Published, Metadata]:
    assert route.provider is not None
    if on_start is not None:
        on_start()
    channel.update("running", 0, job.n)
    result = await route.provider.upscale(job)
    channel.update("encoding", job.n, job.n)
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
        cost=result.cost if result.cost is not None else job.entry.cost(published.size, job.n) or 0.0,
    )
    return published, metadata


async def dry_run(job: Job, services: Services) -> DryRunResponse:
    route = choose_route(job, services.settings, services.engine, services.providers)
    size = f"{job.target[0]}x{job.target[1]}"
    if route.local:
        plan = await services.engine.plan_job(job)
        return DryRunResponse(
            model=job.requested_model,
            provider="local",
            total_cost_micros=0,
            components=[CostComponent(type="output", metric="image", quantity=job.n, billable_quantity=job.n,
                                      unit_price=0.0, total_cost=0)],
            size=size,
            executed_model=plan.executed_model,
            plan=plan.describe(),
        )
    assert route.provider is not None
    upstream = await route.provider.dry_run(job)
    return DryRunResponse.model_validate({"size": size, "executed_model": upstream.get("executed_model", job.requested_model),
                                          **upstream, "plan": {"route": route.provider.name, "why": route.why}})
