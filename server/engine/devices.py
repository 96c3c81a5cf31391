"""One worker thread per device, each with a bounded queue of jobs.

A worker runs one job at a time, so a device never holds two jobs' activations at once and jobs
never see each other's state. A full queue refuses at once (429 with Retry-After) rather than
letting requests pile up; a queued job can be cancelled (its future's `cancel()`) and is skipped.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from server.engine.executor import Counters
from server.engine.models import ModelCache
from server.errors import ApiError

T = TypeVar("T")
_FIRST_GUESS_S = 5.0  # job duration assumed before any job has finished


@dataclass(frozen=True)
class _Job:
    work: Callable[[DeviceWorker], Any]
    future: Future[Any]


_STOP = _Job(lambda worker: None, Future())


class DeviceWorker:
    def __init__(self, device: torch.device, cache: ModelCache, queue_size: int) -> None:
        self.device = device
        self.cache = cache
        self.counters = Counters()
        self.queue_size = queue_size
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._running = 0
        self._mean_job_s = _FIRST_GUESS_S

    @property
    def depth(self) -> int:
        """Jobs waiting or running."""
        return self._queue.qsize() + self._running

    @property
    def full(self) -> bool:
        return self._queue.full()

    def submit(self, work: Callable[[DeviceWorker], T]) -> Future[T]:
        """Queue `work`, to be called with this worker on its thread; a full queue is a 429."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise ApiError(503, "the local engine is shutting down", code="SHUTTING_DOWN")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"loupe-{self.device}", daemon=True)
                self._thread.start()
            try:
                self._queue.put_nowait(_Job(work, future))
            except queue.Full:
                raise ApiError(
                    429,
                    f"the local engine on {self.device} is busy ({self.queue_size} jobs waiting); retry shortly",
                    code="RATE_LIMITED",
                    headers={"Retry-After": str(self.retry_after())},
                ) from None
        return future

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: one frees when the running job ends."""
        return max(1, min(600, math.ceil(self._mean_job_s)))

    def close(self, timeout: float | None = None) -> None:
        """Cancel the queued jobs, let the running one end, stop; waits up to `timeout` s for the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            while True:
                try:
                    self._queue.get_nowait().future.cancel()
                except queue.Empty:
                    break
            if thread is not None:
                self._queue.put_nowait(_STOP)
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            self._running = 1
            started = time.monotonic()
            try:
                result, error = job.work(self), None
            except BaseException as failure:  # handed to whoever waits on the future
                result, error = None, failure
            # Counted out before the waiter wakes, so that it never sees its own job still in the queue.
            self._running = 0
            self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (time.monotonic() - started)
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
