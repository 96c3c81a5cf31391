"""RayEngine: the `Engine` of a Serve ingress, which sends each job to an Upscaler replica.

What a model name means and whether it can run comes from the weights folder, which the ingress sees as the
replicas do (one machine, or a folder shared by the cluster's nodes); how it runs comes from the replicas'
device. A job goes out as the client's encoded image and comes back encoded, its progress streamed before it.
Serve queues the jobs (LOUPE_RAY_QUEUE per ingress), so a reservation here holds nothing and a full queue
shows as the job is sent: a QueueFull, which serving turns into a 429 or the remote twin under
LOUPE_FALLBACK=overload.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from ray import serve
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from server.catalog import ModelEntry
from server.cluster.deployments import APP, UPSCALER, Finished, ReplicaFacts
from server.config import Settings
from server.engine.custom import CustomModel
from server.engine.directory import ModelDirectory
from server.engine.interface import Plan, Progress, Upscaled
from server.engine.planning import PictureFacts
from server.engine.precision import Execution
from server.errors import Cancelled, InternalError, LoupeError, QueueFull, Unavailable
from server.jobs import Job

# The replica, its node or the job's results went away (RayActorError covers a dead or unreachable actor).
_REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, DeploymentUnavailableError)
_FRESH_S = 600  # a replica that has reported nothing for this long no longer counts in the gauges


class _Unreserved:
    """Serve holds the job's place in its queue; there is nothing to give back here."""

    def release(self) -> None:
        return None


class RayEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory = ModelDirectory(settings)
        self.device_name = "Ray Serve"
        self._facts: ReplicaFacts | None = None
        self._handle: Any = None
        self._in_flight = 0
        self._tiles = 0
        # Each replica's counters as it last reported them, and when.
        self._replicas: dict[str, tuple[float, dict[str, float | int | None]]] = {}
        self._typical_s = 1.0  # a job's recent duration: how long a full queue's Retry-After says

    async def start(self) -> None:
        self._handle = serve.get_deployment_handle(UPSCALER, app_name=APP)
        self._facts = await self._handle.describe.remote()
        self.device_name = f"Ray Serve, {self._facts.device_name}"

    async def close(self) -> None:
        return None

    async def find(self, name: str) -> ModelEntry | None:
        return await self.directory.lookup(name)

    async def custom_models(self, wait_s: float) -> list[CustomModel]:
        return await self.directory.list_custom(wait_s)

    def unavailable_reason(self, entry: ModelEntry) -> str | None:
        return self.directory.unavailable_reason(entry)

    def execution(self, entry: ModelEntry) -> Execution:
        """As the replicas run `entry`'s largest native scale, by their device."""
        assert entry.local is not None and self._facts is not None
        weight_id = entry.local.weights[entry.local.native_scales[-1]]
        return self.directory.execution(weight_id, torch.device(self._facts.device_type), self._facts.native_bf16)

    def reserve(self, entry: ModelEntry, picture: PictureFacts, target: tuple[int, int], n: int = 1) -> _Unreserved:
        return _Unreserved()

    async def plan_job(self, job: Job) -> Plan:
        """The plan a replica makes (it waits its turn there, as a job would)."""
        with self._replica_errors():
            planned: Plan = await self._handle.plan_job.remote(job)
        return planned

    async def run(self, job: Job, *, reservation: Any = None, progress: Progress | None = None,
                  cancel: threading.Event | None = None) -> Upscaled:
        began = time.monotonic()
        stream = self._handle.options(stream=True).run.remote(job)
        watcher = asyncio.ensure_future(_cancel_when_set(cancel, stream)) if cancel is not None else None
        self._in_flight += 1
        finished: Finished | None = None
        tiles_done = 0
        try:
            with self._replica_errors():
                async for item in stream:
                    if isinstance(item, Finished):
                        finished = item
                        continue
                    done, total = item
                    self._tiles += max(0, done - tiles_done)
                    tiles_done = done
                    if progress is not None:
                        progress(done, total)
        except (asyncio.CancelledError, Unavailable):
            # The client went away, or the replica is out of reach with its job perhaps running on: that job stops
            # where it still can (cancel() re-raises what ended a stream that ended by itself).
            with contextlib.suppress(Exception):
                stream.cancel()
            raise
        finally:
            self._in_flight -= 1
            if watcher is not None:
                watcher.cancel()
        if finished is None:
            raise InternalError("the Upscaler replica ended the job without its result")
        self._replicas[finished.replica] = (time.monotonic(), finished.stats)
        self._typical_s = 0.7 * self._typical_s + 0.3 * (time.monotonic() - began)
        return finished.upscaled

    @contextlib.contextmanager
    def _replica_errors(self) -> Iterator[None]:
        """Ray's failures as Loupe's domain errors; what the job itself raised on the replica, unchanged."""
        try:
            yield
        except BackPressureError:
            raise QueueFull(f"every Upscaler replica is busy and {self.settings.ray_queue} jobs are already "
                            "waiting for one (LOUPE_RAY_QUEUE); retry later",
                            retry_after_s=max(1.0, round(self._typical_s))) from None
        except RequestCancelledError:
            raise Cancelled("the request was cancelled") from None
        except RayTaskError as failure:
            cause = failure.cause
            if isinstance(cause, LoupeError):
                raise cause from None
            if isinstance(cause, _REPLICA_LOST):
                raise _lost(cause) from None
            raise  # unforeseen, as on a local engine: logged with the replica's traceback, answered 500
        except _REPLICA_LOST as lost:
            raise _lost(lost) from None

    def stats(self) -> dict[str, float | int | None]:
        """The whole deployment, as its one ingress sees it: the jobs sent and not yet back, and every tile done,
        from the jobs' progress; OOM retries summed over every replica that has reported, and GPU memory over
        those that have in the last ten minutes (each replica reports with each job it finishes)."""
        fresh = time.monotonic() - _FRESH_S

        def total(key: str, since: float = 0.0) -> float | int | None:
            values = [value for at, stats in self._replicas.values() if at >= since
                      and (value := stats.get(key)) is not None]
            return sum(values) if values else None

        return {"queue_depth": self._in_flight, "tiles_processed": self._tiles,
                "oom_retries": total("oom_retries"), "gpu_memory_bytes": total("gpu_memory_bytes", fresh)}


def _lost(error: BaseException) -> Unavailable:
    return Unavailable(f"the Upscaler replica running this job stopped ({type(error).__name__}); Serve starts "
                       "another, so sending the request again should succeed", code="REPLICA_LOST", retry_after_s=1)


async def _cancel_when_set(cancel: threading.Event, stream: Any) -> None:
    """DELETE /v1/requests/{id} and the request's deadline set the event: the replica's job is cancelled."""
    while not cancel.is_set():
        await asyncio.sleep(0.1)
    stream.cancel()
