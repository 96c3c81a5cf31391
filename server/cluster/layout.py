"""How many engines a Ray cluster gets, and what each holds: one whole GPU where there are GPUs, else CPUs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from server.config import Settings, SettingsError


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


def plan_layout(replicas: int | Literal["auto"], nodes: list[dict[str, Any]], settings: Settings) -> Layout:
    """GPU engines when the cluster has GPUs (unless LOUPE_DEVICE=cpu), else engines of LOUPE_RAY_REPLICA_CPUS
    CPUs; `auto` up to as many as the cluster holds. `nodes`: `ray.nodes()`. A count the cluster can't place is a
    SettingsError, not a deployment that waits for ever."""
    alive = [node["Resources"] for node in nodes if node.get("Alive", True)]
    gpu_nodes = [node for node in alive if node.get("GPU", 0) >= 1] if settings.device != "cpu" else []
    if gpu_nodes:
        # A GPU engine decodes and encodes on its CPUs: up to 4, as many as every GPU node has per GPU.
        cpus = max(1, min(4, *(int(node.get("CPU", 0) // node["GPU"]) for node in gpu_nodes)))
        fits, holds = sum(int(node["GPU"]) for node in gpu_nodes), "GPU"
    else:
        cpus = settings.ray_replica_cpus
        fits, holds = sum(int(node.get("CPU", 0) // cpus) for node in alive), f"{cpus} CPU (LOUPE_RAY_REPLICA_CPUS)"
    wanted = 1 if replicas == "auto" else replicas
    if wanted > fits:
        raise SettingsError(f"{wanted} Upscaler replicas of {holds} each don't fit in this Ray cluster, which holds "
                            f"{fits}: ask for fewer, or add nodes")
    return Layout(replicas, fits if replicas == "auto" else replicas, bool(gpu_nodes), cpus)


def use_actor_cpus() -> None:
    """torch's threads, in an engine's actor, are the CPUs Ray gave it (Ray says how many in OMP_NUM_THREADS)."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
