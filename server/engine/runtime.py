"""LocalEngine: what the HTTP layer and the CLI call to check, plan and run a local job."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import queue
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from server import imagework
from server import catalog
from server.catalog import MODELS, ModelEntry
from server.config import Settings, SettingsError
from server.engine import custom, openvino_backend, precision
from server.engine.devices import DeviceWorker, Reservation
from server.engine.directory import ModelDirectory
from server.engine.executor import run_tiled
from server.engine.interface import Upscaled
from server.engine.models import (
    LoadedModel,
    ModelCache,
    cache_budget,
    choose_tiling,
    compile_model,
    execution_for,
    free_memory,
    locate,
    parameter_count,
)
from server.engine.pipeline import upscale_picture
from server.engine.planning import JobPlan, ModelFacts, PictureFacts, plan_job
from server.engine.precision import Execution
from server.engine.profiles import ArchProfile, ProfileStore, profile_of
from server.engine.tiling import TilingSpec
from server.engine.weights import MANIFEST
from server.errors import ModelUnavailable
from server.imaging import Picture
from server.jobs import Job

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def visible_devices(setting: str) -> list[torch.device]:
    """LOUPE_DEVICE: every visible GPU for auto (else the CPU), or exactly what was asked for."""
    if setting == "cpu":
        return [torch.device("cpu")]
    if torch.cuda.is_available():
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    if setting == "cuda":
        raise SettingsError("LOUPE_DEVICE=cuda, but torch sees no CUDA device")
    return [torch.device("cpu")]


def engine_devices(settings: Settings) -> list[torch.device]:
    """The devices the engine will use; a setting no device here can honour is a ValueError, at start-up."""
    devices = visible_devices(settings.device)
    precision.check_setting(settings.precision, devices)
    return devices


class LocalEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory = ModelDirectory(settings)
        devices = engine_devices(settings)
        self._compiling = settings.compile and (devices[0].type == "cuda" or openvino_backend.available())
        # Background work (loading, compiling), one item at a time; None stops the thread.
        self._background: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._background_thread: threading.Thread | None = None
        on_load = self._queue_compile if self._compiling else None
        self.profiles = profiles = ProfileStore(settings.data_dir / "profiles.json")
        self.workers = [
            DeviceWorker(device, ModelCache(device, settings.weights_dir, cache_budget(device, settings.vram_budget),
                                            settings.precision, on_load, profiles), settings.queue_budget_s)
            for device in devices
        ]
        self.device_name = _describe(devices)
        if devices[0].type == "cuda":
            torch.backends.cudnn.benchmark = True  # tile shapes are fixed: each is tuned once

    async def start(self) -> None:
        """With LOUPE_COMPILE on: load and compile, in the background, each local model whose weights are here and
        that compiling speeds up: torch.compile on CUDA, OpenVINO for what a CPU runs in fp32.

        Requests never wait for a compile: they run eager until the compiled model is ready.
        """
        if not self._compiling or self._background_thread is not None:
            return
        self._background_thread = threading.Thread(target=self._background_loop, name="loupe-compile", daemon=True)
        self._background_thread.start()
        weight_ids = sorted({w for entry in MODELS if entry.local is not None for w in entry.local.weights.values()})
        for worker in self.workers:
            for weight_id in weight_ids:
                architecture = MANIFEST[weight_id].architecture
                if not self._compiles(worker.device, execution_for(architecture, worker.device,
                                                                   self.settings.precision), profile_of(architecture)):
                    continue
                if locate(weight_id, self.settings.weights_dir) is not None:
                    self._background.put(functools.partial(worker.cache.get, weight_id))

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def unavailable_reason(self, entry: ModelEntry) -> str | None:
        """None when `entry` can run here now; else why not, and the command that fixes it."""
        return self.directory.unavailable_reason(entry)

    async def custom_models(self, wait_s: float) -> list[custom.CustomModel]:
        return await self.directory.list_custom(wait_s)

    async def find(self, name: str) -> ModelEntry | None:
        return await self.directory.lookup(name)

    def execution(self, entry: ModelEntry) -> Execution:
        """How the weight of `entry`'s largest native scale runs on the first device: what /v1/models shows."""
        assert entry.local is not None
        worker = self.workers[0]
        weight_id = entry.local.weights[entry.local.native_scales[-1]]
        loaded = worker.cache.peek(weight_id)
        return loaded.execution if loaded is not None else self.directory.execution(weight_id, worker.device)

    def reserve(self, entry: ModelEntry, picture: PictureFacts, target: tuple[int, int], n: int = 1) -> Reservation:
        """A place for this job on the device with the least work reserved, from the picture's header, before it is
        decoded; QueueFull when every device's budget is spent."""
        worker = min(self.workers, key=lambda w: w.backlog_s)
        return worker.reserve(self._plan_on(worker, entry, picture, target, n).estimated_seconds)

    @property
    def devices(self) -> list[torch.device]:
        return [worker.device for worker in self.workers]

    def plan(self, entry: ModelEntry, picture: PictureFacts | Picture, target: tuple[int, int], n: int = 1,
             reservation: Reservation | None = None, device: torch.device | None = None) -> JobPlan:
        """The one plan of a job: what the dry run shows and `upscale` runs. Loads nothing.

        On the reservation's device, else on `device`, else on the one with the least work reserved.
        """
        facts = picture if isinstance(picture, PictureFacts) else PictureFacts.of(picture)
        if reservation is not None:
            worker = reservation.worker
        elif device is not None:
            worker = next(w for w in self.workers if w.device == device)
        else:
            worker = min(self.workers, key=lambda w: w.backlog_s)
        return self._plan_on(worker, entry, facts, target, n)

    async def upscale(self, plan: JobPlan, picture: Picture, *, reservation: Reservation | None = None,
                      seed: int | None = None, progress: Progress | None = None,
                      cancel: threading.Event | None = None) -> list[Picture]:
        """Run `plan`, as one job: its `images` results. Cancelling the awaiting task cancels the job, queued or
        between tiles.

        ESRGAN models are deterministic: `seed` matters only to AuraSR, which samples noise (None: a random
        seed; image i of the job gets seed + i).
        """
        cancel = cancel or threading.Event()
        future = self._submit(plan, picture, reservation, seed, progress, cancel)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.set()
            future.cancel()
            raise

    async def plan_job(self, job: Job) -> JobPlan:
        """The plan of `job` on the device with the least work reserved, from its decoded picture."""
        picture = await asyncio.to_thread(imagework.decode, job.image, self.settings.max_input_pixels)
        return self.plan(job.entry, picture, job.target, job.n)

    async def run(self, job: Job, *, reservation: Reservation | None = None, progress: Progress | None = None,
                  cancel: threading.Event | None = None) -> Upscaled:
        """The job from its encoded image to its encoded results: decode, plan, upscale, encode."""
        picture = await asyncio.to_thread(imagework.decode, job.image, self.settings.max_input_pixels)
        plan = self.plan(job.entry, picture, job.target, job.n, reservation)
        pictures = await self.upscale(plan, picture, reservation=reservation, seed=job.seed, progress=progress,
                                      cancel=cancel)
        if len(pictures) < job.n:  # a deterministic model: one result, n copies
            pictures = pictures * job.n
        images = await asyncio.to_thread(imagework.encode, pictures, job.output_format, job.output_compression)
        return Upscaled(images, (pictures[0].width, pictures[0].height), plan.executed_model)

    def upscale_sync(self, plan: JobPlan, picture: Picture, *, seed: int | None = None,
                     progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Picture]:
        """`upscale` for callers without an event loop (the CLI)."""
        return self._submit(plan, picture, None, seed, progress, cancel or threading.Event()).result()

    def stats(self) -> dict[str, float | int | None]:
        """Counters and gauges for /metrics."""
        cuda = [w.device for w in self.workers if w.device.type == "cuda"]
        return {
            "queue_depth": sum(w.depth for w in self.workers),
            "queue_seconds": sum(w.backlog_s for w in self.workers),
            "queue_budget_seconds": sum(w.budget_s for w in self.workers),
            "tiles_processed": sum(w.counters.tiles for w in self.workers),
            "oom_retries": sum(w.counters.oom_retries for w in self.workers),
            "gpu_memory_bytes": sum(torch.cuda.memory_allocated(d) for d in cuda) if cuda else None,
            "models_loaded": sum(len(w.cache) for w in self.workers),
            "model_cache_bytes": sum(w.cache.nbytes for w in self.workers),
        }

    def _plan_on(self, worker: DeviceWorker, entry: ModelEntry, picture: PictureFacts, target: tuple[int, int],
                 n: int) -> JobPlan:
        assert entry.local is not None
        return plan_job(entry.id, entry.local, picture, target, n, device=worker.device, device_name=self.device_name,
                        facts=lambda weight_id: self._facts(worker, weight_id), free_memory=free_memory(worker.device),
                        tile_size=self.settings.tile_size, max_side=self.settings.max_output_side)

    def _submit(self, plan: JobPlan, picture: Picture, reservation: Reservation | None, seed: int | None,
                progress: Progress | None, cancel: threading.Event) -> Future[list[Picture]]:
        entry = catalog.find(plan.model) or self.directory.custom_entry(plan.model)
        if entry is None:  # a custom file removed since the plan was made
            raise ModelUnavailable(f"the model {plan.model} is gone")
        reason = self.unavailable_reason(entry)
        if reason is not None:
            raise ModelUnavailable(reason)
        if (picture.width, picture.height) != plan.source_size:
            raise ValueError(f"a {picture.width}x{picture.height} picture for a plan made for {plan.source_size}")
        # One seed for every model run of an image: the runs over black and over white must draw the same noise.
        seed = secrets.randbits(63) if seed is None else seed
        worker = next(w for w in self.workers if w.device == plan.device)
        if reservation is not None:
            reservation.resize(plan.estimated_seconds)
        return worker.submit(functools.partial(self._run, plan, picture, seed, progress, cancel), reservation)

    def _run(self, plan: JobPlan, picture: Picture, seed: int, progress: Progress | None, cancel: threading.Event,
             worker: DeviceWorker) -> list[Picture]:
        """Every image of the plan, on `worker`'s thread; the first report, (0, tiles in all), says the device has
        taken the job."""
        tally = _Tally(progress, plan.images * plan.tiles_per_image)
        if progress is not None:
            progress(0, tally.expected)
        # A varying alpha runs every pass twice (over black, then over white); the input size tells the pass.
        passes = {(p.input_size, p.scale): p for p in plan.passes}
        scales = [p.scale for p in plan.passes]
        # Each network once for the whole job: a custom file replaced meanwhile waits for the next job.
        models = {p.weight_id: worker.cache.get(p.weight_id) for p in plan.passes}

        def image(image_seed: int) -> Picture:
            def run_rgb(pixels: np.ndarray, scale: int) -> np.ndarray:
                step = passes[(pixels.shape[1], pixels.shape[0]), scale]
                model = models[step.weight_id]
                return run_tiled(pixels, model, plan=step.tiles, batch=step.batch, cancel=cancel,
                                 progress=tally.next_run(), counters=worker.counters, seed=image_seed)

            return upscale_picture(picture, plan.target, scales, run_rgb, plan.passes[0].input_size)

        return [image(seed + index) for index in range(plan.images)]

    def _facts(self, worker: DeviceWorker, weight_id: str) -> ModelFacts:
        """From the loaded model if there is one, else from its architecture's profile and its file's header."""
        model = worker.cache.peek(weight_id)
        if model is not None:
            return ModelFacts(weight_id, model.profile, self._spec(model.spec), model.execution, model.params,
                              model.nbytes, model.tile, model.batch,
                              model.compiled.backend if model.compiled is not None else "torch")
        device = worker.device
        inspected = self.directory.inspected(weight_id)
        if weight_id in MANIFEST:  # a built-in weight: its manifest entry and its file's header
            architecture = MANIFEST[weight_id].architecture
            execution = execution_for(architecture, device, self.settings.precision)
            profile = profile_of(architecture)
            params = parameter_count(weight_id, self.settings.weights_dir) or 0
        else:  # a custom file: what its inspection found, and any measurement of its network kept from before
            if inspected is None or inspected.reason is not None:
                raise ModelUnavailable(f"the custom model {weight_id.removeprefix(custom.PREFIX)} can't run now: "
                                       f"{inspected.reason if inspected is not None else 'its file is gone'}")
            architecture, params = inspected.architecture or "?", inspected.params
            execution = execution_for(architecture, device, self.settings.precision, inspected.traits)
            measured = self.profiles.lookup(architecture, inspected.scale, params, device, execution.dtype)
            profile = profile_of(architecture, measured, inspected.traits)
        tile, batch = choose_tiling(profile, profile.tiling, execution.dtype, device, free_memory(device))
        return ModelFacts(weight_id, profile, self._spec(profile.tiling), execution, params,
                          params * execution.dtype.itemsize, tile, batch, "torch")

    def _spec(self, spec: TilingSpec) -> TilingSpec:
        """The tiling as configured: LOUPE_AURA_OVERLAP turns a grid's shifted second pass on or off."""
        return dataclasses.replace(spec, shifted_pass=self.settings.aura_overlap) if spec.grid else spec

    def _queue_compile(self, model: LoadedModel) -> None:
        # Without start() (the CLI) everything stays eager; a compiled AuraSR would draw its own noise.
        # Only the built-in networks: a converted or compiled custom architecture may fail on shapes eager takes.
        if self._background_thread is not None and model.weight_id in MANIFEST \
                and self._compiles(model.device, model.execution, model.profile):
            self._background.put(functools.partial(self._compile, model))

    @staticmethod
    def _compiles(device: torch.device, execution: Execution, profile: ArchProfile) -> bool:
        """Whether compiling speeds a network up there: always on CUDA; on the CPU, OpenVINO's fp32."""
        if profile.stochastic:
            return False
        return device.type == "cuda" or openvino_backend.wanted(device, execution)

    def _compile(self, model: LoadedModel) -> None:
        if model.compiled is not None:
            return
        if model.device.type == "cuda":
            log.info("compiling %s for batches of %s on %s", model.weight_id, model.batch_shape, model.device)
            compile_model(model, self.settings.data_dir / "compile-cache")
        else:
            log.info("preparing %s with OpenVINO on %s", model.weight_id, model.device)
            weights_file = locate(model.weight_id, self.settings.weights_dir)
            assert weights_file is not None  # it was just loaded from there
            model.compiled = openvino_backend.prepare(model, weights_file, self.settings.data_dir / "openvino")
        log.info("compiled %s on %s", model.weight_id, model.device)

    def _background_loop(self) -> None:
        while (task := self._background.get()) is not None:
            try:
                task()
            except Exception:  # requests keep running eager; the reason goes to the log
                log.exception("background model preparation failed; that model stays eager")

    def _close(self) -> None:
        for worker in self.workers:
            worker.close(timeout=self.settings.request_timeout_s)
        if self._background_thread is not None:
            self._background.put(None)  # a compile under way runs to its end; the thread is a daemon


class _Tally:
    """Adds the tiles of a job's successive model runs into one (done, total) report."""

    def __init__(self, progress: Progress | None, expected: int) -> None:
        self.progress = progress
        self.expected = expected
        self.finished = 0  # tiles of the runs before the current one

    def next_run(self) -> Progress | None:
        if self.progress is None:
            return None
        progress, base = self.progress, self.finished

        def report(done: int, total: int) -> None:
            if done == total:
                self.finished = base + done
            progress(base + done, max(self.expected, base + total))

        return report


def _describe(devices: list[torch.device]) -> str:
    if devices[0].type != "cuda":
        return "CPU"
    names = [torch.cuda.get_device_name(device) for device in devices]
    if len(names) == 1:
        return names[0]
    return f"{len(names)}× {names[0]}" if len(set(names)) == 1 else ", ".join(names)
