"""One worker thread per device, admitting jobs by their estimated seconds of work.

A worker runs one job at a time, so a device never holds two jobs' activations at once and jobs
never see each other's state. A job first takes a `Reservation` of its estimated seconds (the
job plan's estimate, corrected by how this device's past jobs compared with theirs). While the
work reserved on a device is past its budget (LOUPE_MAX_QUEUE_S) a new reservation is refused at
once with `QueueFull`, whose retry-after is when enough of that work should be done. A queued job
can be cancelled (its future's `cancel()`) and is skipped.
"""
from __future__ import annotations

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
from server.errors import QueueFull, ShuttingDown

T = TypeVar("T")
MAX_JOBS = 1024  # per device, however small: each queued job holds its decoded picture and a connection
_CALIBRATION_RANGE = (0.1, 10.0)  # measured / estimated seconds, as learnt from finished jobs
_LEARN_FROM_S = 0.25  # shorter jobs are mostly fixed overhead: they would skew the estimates of the long ones


class Reservation:
    """A job's place in a device's budget, held from before its picture is decoded until it ends."""

    def __init__(self, worker: DeviceWorker, seconds: float) -> None:
        self.worker = worker
        self.seconds = seconds  # calibrated: what this job is expected to take here
        self.estimated_s = 0.0  # as planned, before calibration
        self.started = False  # its job is running: from then on only the worker releases it, at the job's end
        self.released = False

    @property
    def device(self) -> torch.device:
        return self.worker.device

    def resize(self, estimated_s: float) -> None:
        """The exact plan's estimate, once the picture is decoded; never refused (the job was admitted)."""
        self.worker._resize(self, estimated_s)

    def release(self) -> None:
        """Give the seconds back, unless the job is running: a cancelled job may still hold the device a while."""
        self.worker._release(self, by_worker=False)


@dataclass(frozen=True)
class _Job:
    work: Callable[[DeviceWorker], Any]
    future: Future[Any]
    reservation: Reservation | None


_STOP = _Job(lambda worker: None, Future(), None)


class DeviceWorker:
    def __init__(self, device: torch.device, cache: ModelCache, budget_s: float) -> None:
        self.device = device
        self.cache = cache
        self.counters = Counters()
        self.budget_s = budget_s
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._running = 0
        self._reserved_s = 0.0  # calibrated seconds of every reservation not yet released
        self._reservations = 0
        self._started: float | None = None  # when the running job began
        self._running_s = 0.0  # its reservation
        self.calibration = 1.0
        self._learnt = False

    @property
    def depth(self) -> int:
        """Jobs waiting or running."""
        return self._queue.qsize() + self._running

    @property
    def backlog_s(self) -> float:
        """Seconds of reserved work still to do here, by the estimates."""
        with self._lock:
            return self._backlog_locked()

    def reserve(self, estimated_s: float) -> Reservation:
        """Take `estimated_s` (a plan's estimate) of this device's budget, or raise QueueFull / ShuttingDown.

        An idle device takes any job, however long: else a job over the budget could never run.
        """
        with self._lock:
            if self._closed:
                raise ShuttingDown("the local engine is shutting down")
            seconds = estimated_s * self.calibration
            backlog = self._backlog_locked()
            if self._reservations and (backlog + seconds > self.budget_s or self._reservations >= MAX_JOBS):
                wait = max(1.0, backlog + seconds - self.budget_s)
                raise QueueFull(
                    f"the local engine on {self.device} has about {backlog:.0f} s of work queued, and this job would "
                    f"add about {seconds:.1f} s to it, past the {self.budget_s:g} s budget (LOUPE_MAX_QUEUE_S); "
                    f"retry in about {wait:.0f} s",
                    retry_after_s=wait,
                )
            reservation = Reservation(self, seconds)
            reservation.estimated_s = estimated_s
            self._reserved_s += seconds
            self._reservations += 1
            return reservation

    def submit(self, work: Callable[[DeviceWorker], T], reservation: Reservation | None = None) -> Future[T]:
        """Queue `work`, to be called with this worker on its thread; its reservation is released when it ends."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise ShuttingDown("the local engine is shutting down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"loupe-{self.device}", daemon=True)
                self._thread.start()
            self._queue.put_nowait(_Job(work, future, reservation))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Cancel the queued jobs, let the running one end, stop; waits up to `timeout` s for the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job.future.set_running_or_notify_cancel():  # not cancelled by its waiter already
                    job.future.set_exception(ShuttingDown("the local engine shut down before this job could start"))
                if job.reservation is not None:
                    self._release_locked(job.reservation)
            if thread is not None:
                self._queue.put_nowait(_STOP)
        if thread is not None:
            thread.join(timeout)

    def _backlog_locked(self) -> float:
        elapsed = time.monotonic() - self._started if self._started is not None else 0.0
        return max(0.0, self._reserved_s - min(elapsed, self._running_s))

    def _resize(self, reservation: Reservation, estimated_s: float) -> None:
        with self._lock:
            if reservation.released:
                return
            seconds = estimated_s * self.calibration
            self._reserved_s += seconds - reservation.seconds
            reservation.seconds, reservation.estimated_s = seconds, estimated_s

    def _release(self, reservation: Reservation, *, by_worker: bool) -> None:
        with self._lock:
            if by_worker or not reservation.started:
                self._release_locked(reservation)

    def _release_locked(self, reservation: Reservation) -> None:
        if not reservation.released:
            reservation.released = True
            self._reserved_s = max(0.0, self._reserved_s - reservation.seconds)
            self._reservations -= 1

    def _learn(self, estimated_s: float, measured_s: float) -> None:
        """Move the calibration towards this job's measured / estimated ratio."""
        if estimated_s < _LEARN_FROM_S:
            return
        low, high = _CALIBRATION_RANGE
        ratio = min(high, max(low, measured_s / estimated_s))
        self.calibration = 0.7 * self.calibration + 0.3 * ratio if self._learnt else ratio
        self._learnt = True

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if not job.future.set_running_or_notify_cancel():
                if job.reservation is not None:
                    self._release(job.reservation, by_worker=True)
                continue  # cancelled while queued
            loading_before = self.cache.loading_s
            with self._lock:
                self._running = 1
                self._started = time.monotonic()
                self._running_s = job.reservation.seconds if job.reservation is not None else 0.0
                if job.reservation is not None:
                    job.reservation.started = True
            try:
                result, error = job.work(self), None
            except BaseException as failure:  # handed to whoever waits on the future
                result, error = None, failure
            # Counted out before the waiter wakes, so that it never sees its own job still queued.
            with self._lock:
                measured = time.monotonic() - (self._started or time.monotonic())
                measured -= self.cache.loading_s - loading_before
                self._running, self._started, self._running_s = 0, None, 0.0
                if job.reservation is not None:
                    self._release_locked(job.reservation)
                    if error is None:
                        self._learn(job.reservation.estimated_s, measured)
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
