"""Where a job runs: on the local engine, or on a remote provider.

`LOUPE_FALLBACK` decides when a model Loupe could run itself goes to its remote
twin instead: `never`; `unavailable` (no weights, or an output over the local
limit); `overload` (that, or no local device can take the job's work now).
"""
from __future__ import annotations

from dataclasses import dataclass

from server.config import Settings
from server.catalog import ModelEntry
from server.engine.interface import Engine
from server.errors import InvalidInput, LoupeError, ModelUnavailable
from server.jobs import Job
from server.remote import Provider, RemoteProviders


@dataclass(frozen=True)
class Route:
    provider: Provider | None  # None: the local engine
    why: str

    @property
    def local(self) -> bool:
        return self.provider is None


def local_blocker(job: Job, settings: Settings, engine: Engine) -> LoupeError | None:
    """Why this job can't run locally, or None if it can."""
    entry = job.entry
    if entry.local is None:
        needed = [setting for setting, serves in (("LOUPE_FAL_KEY", entry.fal is not None),
                                                  ("LOUPE_GATEWAY_URL", entry.gateway)) if serves]
        return ModelUnavailable(f"{job.requested_model} runs only on a remote provider, and none that serves it is "
                                f"configured: set {' or '.join(needed)}", code="PROVIDER_NOT_CONFIGURED")
    reason = engine.unavailable_reason(entry)
    if reason is not None:
        return ModelUnavailable(reason)
    width, height = job.target
    if max(width, height) > settings.max_output_side:
        return InvalidInput(
            f"the output would be {width}x{height}, over the local limit of {settings.max_output_side} pixels per side "
            "(LOUPE_MAX_OUTPUT_SIDE): ask for a smaller scale_factor or size",
            "size" if job.size_given else "scale_factor",
            code="OUTPUT_TOO_LARGE",
        )
    return None


def remote_for(entry: ModelEntry | None, model_id: str, settings: Settings, providers: RemoteProviders) -> Provider | None:
    """The provider a model may go to: any model Loupe can't run locally, and a local one unless LOUPE_FALLBACK=never."""
    if entry is not None and entry.local is not None and settings.fallback == "never":
        return None
    return providers.route(entry, model_id)


def choose_route(job: Job, settings: Settings, engine: Engine, providers: RemoteProviders) -> Route:
    blocker = local_blocker(job, settings, engine)
    if blocker is None:
        return Route(None, "local")
    remote = remote_for(job.entry, job.requested_model, settings, providers)
    if remote is not None:
        return Route(remote, blocker.message)
    raise blocker


def overflow_route(job: Job, settings: Settings, providers: RemoteProviders) -> Route | None:
    """Where a local job goes when no device can take its work now: its remote twin under `overload`, else nowhere
    (the client gets the 429)."""
    remote = remote_for(job.entry, job.requested_model, settings, providers)
    if remote is None or settings.fallback != "overload":
        return None
    return Route(remote, "the local queues are past their budget (LOUPE_MAX_QUEUE_S)")
