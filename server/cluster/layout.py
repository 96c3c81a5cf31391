"""How many engines a Ray cluster gets, and what each holds: one whole GPU where there are GPUs, else CPUs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from server.config import Settings


# Jobs a replica holds: one on its device, and one decoding or encoding beside it, as a local server overlaps
# them. Its engine runs one at a time on the device.
JOBS_PER_REPLICA = 2


@dataclass(frozen=True)
class Layout:
    """`replicas` engines, or `auto`: Serve autoscaling between 1 and `max_replicas` (what the cluster holds)."""

    replicas: int | Literal["auto"]
    max_replicas: int
    gpus: bool
    replica_cpus: int

    @property
    def resources(self) -> dict[str, Any]:
        """What one engine's actor takes. Ray doesn't split a GPU's memory, so each engine has a whole GPU; a GPU
        engine still decodes and encodes on its CPUs, and a CPU engine's torch threads are its CPUs."""
        return {"num_gpus": 1, "num_cpus": self.replica_cpus} if self.gpus else {"num_cpus": self.replica_cpus}

    def serve_options(self, settings: Settings, env: dict[str, str]) -> dict[str, Any]:
        """The Upscaler deployment's options: JOBS_PER_REPLICA in each, LOUPE_RAY_QUEUE waiting per caller."""
        options: dict[str, Any] = {"ray_actor_options": {**self.resources, "runtime_env": {"env_vars": env}},
                                   "max_ongoing_requests": JOBS_PER_REPLICA, "max_queued_requests": settings.ray_queue,
                                   "graceful_shutdown_timeout_s": settings.request_timeout_s}
        if self.replicas == "auto":
            # Never to zero: a cold replica loads torch, the weights and maybe a compile before its first job.
            options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": 1, "upscale_delay_s": 5,
                                             "downscale_delay_s": 600}
        else:
            options["num_replicas"] = self.replicas
        return options


def plan_layout(replicas: int | Literal["auto"], resources: dict[str, float], settings: Settings) -> Layout:
    """GPU engines when the cluster has GPUs (unless LOUPE_DEVICE=cpu), else engines of LOUPE_RAY_REPLICA_CPUS
    CPUs; `auto` up to as many as the cluster holds. `resources`: `ray.cluster_resources()`."""
    gpus = int(resources.get("GPU", 0)) if settings.device != "cpu" else 0
    cpus = int(resources.get("CPU", 0))
    if gpus:
        return Layout(replicas, gpus if replicas == "auto" else replicas, True, max(1, min(4, cpus // gpus)))
    fits = max(1, cpus // settings.ray_replica_cpus)
    return Layout(replicas, fits if replicas == "auto" else replicas, False, settings.ray_replica_cpus)


def use_actor_cpus() -> None:
    """torch's threads, in an engine's actor, are the CPUs Ray gave it (Ray says how many in OMP_NUM_THREADS)."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
