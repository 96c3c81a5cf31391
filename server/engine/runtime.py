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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from server.catalog import MODELS, ModelEntry
from server.config import Settings
from server.engine.devices import DeviceWorker
from server.engine.executor import run_tiled
from server.engine.models import (
    PROFILES,
    UNKNOWN_PROFILE,
    ArchProfile,
    LoadedModel,
    ModelCache,
    batch_bytes,
    cache_budget,
    choose_tiling,
    compile_model,
    free_memory,
    offline_hint,
    parameter_count,
    seconds_for,
)
from server.engine.pipeline import constant_alpha, model_runs, plan_passes, upscale_picture
from server.engine.tiling import Plan, TilingSpec, plan_tiles
from server.engine.weights import MANIFEST, find_weights
from server.errors import ApiError
from server.imaging import Picture

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def visible_devices(setting: str) -> list[torch.device]:
    """LOUPE_DEVICE: every visible GPU for auto (else the CPU), or exactly what was asked for."""
    if setting == "cpu":
        return [torch.device("cpu")]
    if torch.cuda.is_available():
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    if setting == "cuda":
        raise ValueError("LOUPE_DEVICE=cuda, but torch sees no CUDA device")
    return [torch.device("cpu")]


@dataclass(frozen=True)
class _Sizing:
    """What a dry-run plan needs to know about a model, loaded or not."""

    tile: int
    batch: int
    spec: TilingSpec
    profile: ArchProfile
    dtype: torch.dtype
    params: int
    nbytes: int
    compiled: bool


class LocalEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        devices = visible_devices(settings.device)
        self._compiling = settings.compile and devices[0].type == "cuda"
        # Background work (loading, compiling), one item at a time; None stops the thread.
        self._background: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._background_thread: threading.Thread | None = None
        on_load = self._queue_compile if self._compiling else None
        self.workers = [
            DeviceWorker(device, ModelCache(device, settings.weights_dir, cache_budget(device, settings.vram_budget),
                                            on_load), settings.queue_size)
            for device in devices
        ]
        self.device_name = _describe(devices)
        if devices[0].type == "cuda":
            torch.backends.cudnn.benchmark = True  # tile shapes are fixed: each is tuned once

    async def start(self) -> None:
        """On CUDA with LOUPE_COMPILE on: load and compile, in the background, each local model whose weights are here.

        Requests never wait for a compile: they run eager until the compiled model is ready.
        """
        if not self._compiling or self._background_thread is not None:
            return
        self._background_thread = threading.Thread(target=self._background_loop, name="loupe-compile", daemon=True)
        self._background_thread.start()
        weight_ids = sorted({w for entry in MODELS if entry.local is not None and entry.local.family == "esrgan"
                             for w in entry.local.weights.values()})
        for worker in self.workers:
            for weight_id in weight_ids:
                if find_weights(weight_id, self.settings.weights_dir) is not None:
                    self._background.put(functools.partial(worker.cache.get, weight_id))

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def unavailable_reason(self, entry: ModelEntry) -> str | None:
        """None when `entry` can run here now; else why not, and the command that fixes it."""
        if entry.local is None:
            return f"{entry.id} has no local weights"
        weights_dir = self.settings.weights_dir
        missing = [w for w in entry.local.weights.values() if find_weights(w, weights_dir) is None]
        if missing:
            pulls = " and ".join(f"`loupe weights pull {w}`" for w in missing)
            offline = "; ".join(sorted({offline_hint(w, weights_dir) for w in missing}))
            return f"the weights {', '.join(missing)} are not in {weights_dir}: run {pulls} (or {offline})"
        return None

    def overloaded(self) -> bool:
        """Every device's queue is full."""
        return all(worker.full for worker in self.workers)

    def plan(self, entry: ModelEntry, size: tuple[int, int], target: tuple[int, int], channels: int) -> dict[str, Any]:
        """A dry run: passes, device, dtype, tiles, rough peak memory and time; loads and runs nothing."""
        assert entry.local is not None
        worker = self._least_busy()
        passes = plan_passes(max(target[0] / size[0], target[1] / size[1]), entry.local.native_scales)
        runs = model_runs(channels, False, passes)
        runs_per_pass = runs // len(passes)
        steps: list[dict[str, Any]] = []
        dtypes: set[str] = set()
        seconds, device_peak, host_peak = 0.0, 0, 0
        width, height = size
        on_gpu = worker.device.type == "cuda"
        for native in passes:
            weight_id = entry.local.weights[native]
            sizing = self._sizing(worker, weight_id)
            plan = plan_tiles((width, height), native, sizing.tile, sizing.spec, fixed_window=on_gpu)
            dtypes.add(str(sizing.dtype).removeprefix("torch."))
            band = _band_bytes(plan)
            device_peak = max(device_peak, sizing.nbytes + batch_bytes(sizing.profile, sizing.dtype, plan.window,
                                                                        sizing.batch) + (band if on_gpu else 0))
            host_peak = max(host_peak, _image_bytes(plan) + (0 if on_gpu else band))
            seconds += runs_per_pass * seconds_for(sizing.params, plan.window_pixels, worker.device, sizing.compiled,
                                                   sizing.profile.work)
            steps.append({"scale": native, "weights": weight_id, "input": [width, height],
                          "output": [width * native, height * native], "tile": sizing.tile, "batch": sizing.batch,
                          "tiles": len(plan.tiles), "model_runs": runs_per_pass})
            width, height = width * native, height * native
        return {
            "device": str(worker.device),
            "device_name": self.device_name,
            "dtype": ", ".join(sorted(dtypes)) or None,
            "passes": steps,
            "model_runs": runs,
            "estimated_peak_device_bytes": device_peak,
            "estimated_peak_host_bytes": host_peak,
            "estimated_seconds": round(seconds, 2),
        }

    async def upscale(self, entry: ModelEntry, picture: Picture, target: tuple[int, int], *, seed: int | None = None,
                      progress: Progress | None = None, cancel: threading.Event | None = None) -> Picture:
        """Run on the least busy device. Cancelling the awaiting task cancels the job, queued or between tiles.

        ESRGAN models are deterministic: `seed` matters only to AuraSR, which samples noise (None: a random seed).
        """
        cancel = cancel or threading.Event()
        future = self._submit(entry, picture, target, seed, progress, cancel)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.set()
            future.cancel()
            raise

    def upscale_sync(self, entry: ModelEntry, picture: Picture, target: tuple[int, int], *, seed: int | None = None,
                     progress: Progress | None = None, cancel: threading.Event | None = None) -> Picture:
        """`upscale` for callers without an event loop (the CLI)."""
        return self._submit(entry, picture, target, seed, progress, cancel or threading.Event()).result()

    def stats(self) -> dict[str, float | int | None]:
        """Counters and gauges for /metrics."""
        cuda = [w.device for w in self.workers if w.device.type == "cuda"]
        return {
            "queue_depth": sum(w.depth for w in self.workers),
            "queue_capacity": sum(w.queue_size for w in self.workers),
            "tiles_processed": sum(w.counters.tiles for w in self.workers),
            "oom_retries": sum(w.counters.oom_retries for w in self.workers),
            "gpu_memory_bytes": sum(torch.cuda.memory_allocated(d) for d in cuda) if cuda else None,
            "models_loaded": sum(len(w.cache) for w in self.workers),
            "model_cache_bytes": sum(w.cache.nbytes for w in self.workers),
        }

    def _least_busy(self) -> DeviceWorker:
        return min(self.workers, key=lambda worker: worker.depth)

    def _submit(self, entry: ModelEntry, picture: Picture, target: tuple[int, int], seed: int | None,
                progress: Progress | None, cancel: threading.Event) -> Future[Picture]:
        reason = self.unavailable_reason(entry)
        if reason is not None:
            raise ApiError(503, reason, param="model", code="MODEL_UNAVAILABLE", retryable=False)
        # One seed for every model run of the job: the runs over black and over white must draw the same noise.
        seed = secrets.randbits(63) if seed is None else seed
        return self._least_busy().submit(functools.partial(self._run, entry, picture, target, seed, progress, cancel))

    def _run(self, entry: ModelEntry, picture: Picture, target: tuple[int, int], seed: int, progress: Progress | None,
             cancel: threading.Event, worker: DeviceWorker) -> Picture:
        """One job, on `worker`'s thread."""
        assert entry.local is not None
        weights = entry.local.weights
        tally = _Tally(progress, self._expected_tiles(worker, entry, picture, target))

        def run_rgb(pixels: np.ndarray, native_scale: int) -> np.ndarray:
            model = worker.cache.get(weights[native_scale])
            return run_tiled(pixels, model, tile=self._tile(model), batch=model.batch, cancel=cancel,
                             progress=tally.next_run(), counters=worker.counters, spec=self._spec(model.spec),
                             seed=seed)

        return upscale_picture(picture, target, entry.local.native_scales, run_rgb)

    def _expected_tiles(self, worker: DeviceWorker, entry: ModelEntry, picture: Picture,
                        target: tuple[int, int]) -> int:
        """Tiles of every model run the job is expected to make, for a progress total that does not jump."""
        assert entry.local is not None
        width, height = picture.width, picture.height
        passes = plan_passes(max(target[0] / width, target[1] / height), entry.local.native_scales)
        runs_per_pass = model_runs(picture.channels, constant_alpha(picture) is not None, passes) // len(passes)
        total = 0
        for native in passes:
            model = worker.cache.get(entry.local.weights[native])
            plan = plan_tiles((width, height), native, self._tile(model), self._spec(model.spec),
                              fixed_window=worker.device.type == "cuda")
            total += runs_per_pass * len(plan.tiles)
            width, height = width * native, height * native
        return total

    def _tile(self, model: LoadedModel) -> int:
        """LOUPE_TILE_SIZE when set (0: full frame), else what was chosen for the model's device at load.

        A grid model (AuraSR) always runs its native tile.
        """
        return model.tile if self.settings.tile_size is None or model.spec.grid else self.settings.tile_size

    def _spec(self, spec: TilingSpec) -> TilingSpec:
        """The tiling as configured: LOUPE_AURA_OVERLAP turns a grid's shifted second pass on or off."""
        return dataclasses.replace(spec, shifted_pass=self.settings.aura_overlap) if spec.grid else spec

    def _sizing(self, worker: DeviceWorker, weight_id: str) -> _Sizing:
        """From the loaded model if there is one, else from its architecture's profile and its file's header."""
        override = self.settings.tile_size
        model = worker.cache.peek(weight_id)
        if model is not None:
            tile = self._tile(model)
            return _Sizing(tile, model.batch if tile else 1, self._spec(model.spec), model.profile, model.dtype,
                           model.params, model.nbytes, model.compiled is not None)
        profile = PROFILES.get(MANIFEST[weight_id].architecture, UNKNOWN_PROFILE)
        device = worker.device
        dtype = torch.float16 if device.type == "cuda" and profile.supports_half else torch.float32
        tile, batch = choose_tiling(profile, profile.tiling, dtype, device, free_memory(device))
        if override is not None and not profile.tiling.grid:
            tile, batch = override, batch if override else 1
        params = parameter_count(weight_id, self.settings.weights_dir) or 0
        return _Sizing(tile, batch, self._spec(profile.tiling), profile, dtype, params, params * dtype.itemsize, False)

    def _queue_compile(self, model: LoadedModel) -> None:
        # Without start() (the CLI) everything stays eager; a compiled AuraSR would draw its own noise.
        if self._background_thread is not None and not model.profile.stochastic:
            self._background.put(functools.partial(self._compile, model))

    def _compile(self, model: LoadedModel) -> None:
        if model.compiled is not None:
            return
        log.info("compiling %s for batches of %s on %s", model.weight_id, model.batch_shape, model.device)
        compile_model(model, self.settings.data_dir / "compile-cache")
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


def _image_bytes(plan: Plan) -> int:
    """The 8-bit input and output of one model run, on the host."""
    out_width, out_height = plan.output_size
    return 3 * (plan.size[0] * plan.size[1] + out_width * out_height)


def _band_bytes(plan: Plan) -> int:
    """The executor's float band, on the model's device: about one row of tile outputs, 16 bytes a pixel."""
    return 16 * plan.scale * plan.window[1] * plan.output_size[0]
