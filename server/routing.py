"""Where a job runs: on the local engine, or on a remote provider.

`LOUPE_FALLBACK` decides when a model Loupe could run itself goes to its remote
twin instead: `never`; `unavailable` (no weights, or an output over the local
limit); `overload` (that, or every local queue is full).
"""
from __future__ import annotations

from dataclasses import dataclass

from server.config import Settings
from server.engine.runtime import LocalEngine
from server.errors import ApiError
from server.jobs import Job
from server.remote import Provider, RemoteProviders


@dataclass(frozen=True)
class Route:
    provider: Provider | None  # None: the local engine
    why: str

    @property
    def local(self) -> bool:
        return self.provider is None


def local_blocker(job: Job, settings: Settings, engine: LocalEngine) -> ApiError | None:
    """Why this job can't run locally, or None if it can."""
    entry = job.entry
    if entry.local is None:
        needed = [setting for setting, serves in (("LOUPE_FAL_KEY", entry.fal is not None),
                                                  ("LOUPE_GATEWAY_URL", entry.gateway)) if serves]
        return ApiError(
            503,
            f"{job.requested_model} runs only on a remote provider, and none that serves it is configured: "
            f"set {' or '.join(needed)}",
            param="model",
            code="PROVIDER_NOT_CONFIGURED",
            retryable=False,
        )
    reason = engine.unavailable_reason(entry)
    if reason is not None:
        return ApiError(503, reason, param="model", code="MODEL_UNAVAILABLE", retryable=False)
    width, height = job.target
    if max(width, height) > settings.max_output_side:
        return ApiError(
            400,
            f"the output would be {width}x{height}, over the local limit of {settings.max_output_side} pixels per side "
            "(LOUPE_MAX_OUTPUT_SIDE): ask for a smaller scale_factor or size",
            param="size" if job.size_given else "scale_factor",
            code="OUTPUT_TOO_LARGE",
        )
    return None


def choose_route(job: Job, settings: Settings, engine: LocalEngine, providers: RemoteProviders) -> Route:
    blocker = local_blocker(job, settings, engine)
    remote = providers.route(job.entry, job.requested_model)
    if job.entry.local is not None and settings.fallback == "never":
        remote = None
    if blocker is None:
        if remote is not None and settings.fallback == "overload" and engine.overloaded():
            return Route(remote, "local queues are full")
        return Route(None, "local")
    if remote is not None:
        return Route(remote, blocker.message)
    raise blocker
