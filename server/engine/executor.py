"""Runs a tile plan on a device, with bounded host memory.

The input and the output stay on the host; only batches of tile windows travel to the device.
The output is written in its final dtype: tiles add into a float32 band of the rows not yet
final, and rows leave the band, quantized, as soon as no pending tile reaches them.

On CUDA the next batch is launched (pinned upload, forward, asynchronous download) before the
previous one is blended on the host, so copies and blending overlap compute. When a batch runs
out of memory, the executor frees the cache, halves the tile and re-plans what is left from the
failed tile on: finished tiles are never run again. A grid plan (AuraSR) keeps its native tile
and halves the batch instead.

A model that samples noise (AuraSR) gets it drawn from the job's seed for each batch's windows.
"""
from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from server.engine.aura import SeededNoise
from server.engine.models import LoadedModel
from server.engine.tiling import Box, Plan, Tile, TilingSpec, plan_remaining, plan_tiles
from server.errors import ApiError

log = logging.getLogger(__name__)

MIN_TILE = 16
_FLUSH_ROWS = 64  # rows quantized at a time, bounding the temporaries

Forward = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


class Cancelled(ApiError):
    """The job's cancel event was set (its client went away, or it timed out); raised between batches."""

    def __init__(self) -> None:
        super().__init__(499, "the job was cancelled", code="CANCELLED", retryable=False)


@dataclass
class Counters:
    """What a device worker has done; written only by its own thread."""

    tiles: int = 0
    oom_retries: int = 0


def run_tiled(
    pixels: np.ndarray,
    model: LoadedModel,
    *,
    tile: int,
    batch: int = 1,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    counters: Counters | None = None,
    forward: Forward | None = None,
    spec: TilingSpec | None = None,
    seed: int | None = None,
) -> np.ndarray:
    """Upscale H×W×3 uint8 or uint16 `pixels` by `model.scale`; the result has their dtype.

    `tile` is the largest core side (0: one full-frame pass). `forward` replaces the call of the
    model (by default the model itself). `progress` gets (tiles done, tiles in all) after each batch.
    `spec` replaces the model's tiling spec. A model that samples noise draws it from `seed` (None:
    a random one); other models ignore it.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected H×W×3 uint8 or uint16 pixels, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    plan = plan_tiles((width, height), model.scale, tile, spec or model.spec, fixed_window=model.device.type == "cuda")
    noise = None
    if model.profile.stochastic:
        noise = SeededNoise(secrets.randbits(63) if seed is None else seed, model.descriptor.model)
    run = _Run(pixels, model, forward or model, max(1, batch), counters or Counters(), noise)
    return run.execute(plan, cancel, progress)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


@dataclass
class _Launched:
    """A batch on its way: outputs are (rows, columns, RGB·weight + weight) float32 on the host once `ready`."""

    plan: Plan
    last: int  # index of its last tile in `plan`
    tiles: tuple[Tile, ...]
    outputs: list[torch.Tensor]
    ready: torch.cuda.Event | None


class _Run:
    """One job's state: nothing here is shared with other jobs."""

    def __init__(self, pixels: np.ndarray, model: LoadedModel, forward: Forward, batch: int, counters: Counters,
                 noise: SeededNoise | None) -> None:
        self.pixels = pixels
        self.model = model
        self.forward = forward
        self.batch = batch
        self.counters = counters
        self.noise = noise
        self.maxval = float(np.iinfo(pixels.dtype).max)
        height, width = pixels.shape[:2]
        self.out = np.empty((height * model.scale, width * model.scale, 3), dtype=pixels.dtype)
        self.band = _Band(self.out, self.maxval)
        self.cuda = model.device.type == "cuda"
        self.ramps: dict[int, tuple[np.ndarray, torch.Tensor]] = {}
        self.done = 0

    def execute(self, plan: Plan, cancel: threading.Event | None, progress: Progress | None) -> np.ndarray:
        index, pending = 0, None
        while index < len(plan.tiles):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            group = plan.tiles[index : index + self.batch]
            try:
                launched, failure = self._launch(plan, index, group), None
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                # Without its traceback the error no longer pins the failed batch's tensors.
                launched, failure = None, error.with_traceback(None)
            if failure is not None and plan.spec.grid:
                self._halve_batch(plan, failure)
                continue
            if failure is not None:
                resumed = self._shrink(plan, index, failure)
                if pending is not None:
                    final_rows = min(pending.plan.flush_after[pending.last], resumed.first_open_row)
                    self._land(pending, final_rows, progress, len(resumed.tiles))
                    pending = None
                plan, index = resumed, 0
                continue
            if pending is not None:
                self._land(pending, pending.plan.flush_after[pending.last], progress, len(plan.tiles) - index)
            pending = launched
            index += len(group)
        if pending is not None:
            self._land(pending, pending.plan.flush_after[pending.last], progress, 0)
        self.band.flush(self.out.shape[0])
        return self.out

    def _shrink(self, plan: Plan, failed: int, error: RuntimeError) -> Plan:
        tile = plan.tile // 2
        if tile < MIN_TILE:
            raise ApiError(503, f"{self.model.device} ran out of memory running {self.model.weight_id} even with "
                                f"{plan.tile}-pixel tiles; retry later or on a larger device",
                           code="DEVICE_OUT_OF_MEMORY") from error
        self.counters.oom_retries += 1
        if self.cuda:
            torch.cuda.empty_cache()
        log.warning("%s ran out of memory with %d-px tiles; going on from tile %d with %d-px tiles",
                    self.model.device, plan.tile, failed, tile)
        return plan_remaining(plan, failed, tile)

    def _halve_batch(self, plan: Plan, error: RuntimeError) -> None:
        """Out of memory on a grid plan: the tile is the model's own, so fewer windows go at a time."""
        if self.batch == 1:
            raise ApiError(503, f"{self.model.device} ran out of memory running {self.model.weight_id} even one "
                                f"{plan.tile}-pixel tile at a time; retry later or on a larger device",
                           code="DEVICE_OUT_OF_MEMORY") from error
        self.counters.oom_retries += 1
        if self.cuda:
            torch.cuda.empty_cache()
        log.warning("%s ran out of memory with batches of %d; going on with %d", self.model.device, self.batch,
                    self.batch // 2)
        self.batch //= 2

    @torch.inference_mode()
    def _launch(self, plan: Plan, index: int, group: tuple[Tile, ...]) -> _Launched:
        windows = np.stack([_read(self.pixels, t.window) for t in group])
        batch = self._upload(windows)
        if self.noise is not None:
            batch = self.noise.attach(batch, [t.window for t in group])
        compiled = self.model.compiled
        if compiled is not None and len(group) < compiled.shape[0] and tuple(batch.shape[1:]) == compiled.shape[1:]:
            # A short last batch padded to the compiled shape still beats an eager pass.
            batch = torch.cat([batch, batch[-1:].expand(compiled.shape[0] - len(group), -1, -1, -1)])
        result = self.forward(batch)
        outputs = []
        for i, t in enumerate(group):
            rows, cols = plan.crop(t)
            weight = self._on_device(t.weight_y).view(-1, 1) * self._on_device(t.weight_x).view(1, -1)
            weighted = torch.cat([result[i, :, rows, cols].float() * weight, weight[None]]).permute(1, 2, 0)
            outputs.append(self._download(weighted))
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()
        return _Launched(plan, index + len(group) - 1, group, outputs, ready)

    def _upload(self, windows: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(windows)
        if self.cuda:
            host = host.pin_memory()
        batch = host.to(self.model.device, non_blocking=True).permute(0, 3, 1, 2)
        batch = (batch.float() / self.maxval).to(self.model.dtype)
        layout = torch.channels_last if self.model.channels_last else torch.contiguous_format
        return batch.contiguous(memory_format=layout)

    def _on_device(self, weights: np.ndarray) -> torch.Tensor:
        """A blend ramp on the device, uploaded once per run; a plan shares a few ramps among all its tiles."""
        key = id(weights)
        if key not in self.ramps:
            host = torch.from_numpy(weights.copy())
            if self.cuda:
                host = host.pin_memory()  # a pageable upload would wait for the batch in flight
            # The array is kept with its tensor, so its id can't be reused for another array meanwhile.
            self.ramps[key] = (weights, host.to(self.model.device, non_blocking=True))
        return self.ramps[key][1]

    def _download(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    def _land(self, launched: _Launched, final_rows: int, progress: Progress | None, waiting: int) -> None:
        if launched.ready is not None:
            launched.ready.synchronize()
        for t, output in zip(launched.tiles, launched.outputs):
            self.band.add(t.paste, output.numpy())
        self.band.flush(final_rows)
        self.done += len(launched.tiles)
        self.counters.tiles += len(launched.tiles)
        if progress is not None:
            progress(self.done, self.done + waiting)


class _Band:
    """Float32 sums (RGB·weight, weight) for the output rows that are not final yet."""

    def __init__(self, out: np.ndarray, maxval: float) -> None:
        self.out = out
        self.maxval = maxval
        self.top = 0  # first row not yet written to `out`
        self.sums = np.zeros((0, out.shape[1], 4), dtype=np.float32)

    def add(self, box: Box, values: np.ndarray) -> None:
        if box.y0 < self.top:
            raise AssertionError(f"a tile reaches row {box.y0}, already final up to {self.top}")
        needed = box.y1 - self.top
        if needed > len(self.sums):
            grown = np.zeros((needed, *self.sums.shape[1:]), dtype=np.float32)
            grown[: len(self.sums)] = self.sums
            self.sums = grown
        self.sums[box.y0 - self.top : box.y1 - self.top, box.x0 : box.x1] += values

    def flush(self, until: int) -> None:
        """Quantize rows up to `until` (exclusive) into the output and drop them from the band."""
        count = min(until - self.top, len(self.sums))
        if count <= 0:
            return
        for start in range(0, count, _FLUSH_ROWS):
            sums = self.sums[start : min(count, start + _FLUSH_ROWS)]
            values = sums[..., :3] * (self.maxval / sums[..., 3:])
            values += 0.5
            np.clip(values, 0, self.maxval, out=values)
            self.out[self.top + start : self.top + start + len(sums)] = values.astype(self.out.dtype)
        kept = len(self.sums) - count
        self.sums[:kept] = self.sums[count:]
        self.sums[kept:] = 0
        self.top += count


def _read(pixels: np.ndarray, box: Box) -> np.ndarray:
    """The pixels under `box`; outside the image they are read reflected (as numpy's "reflect" pads)."""
    height, width = pixels.shape[:2]
    if box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height:
        return pixels[box.y0 : box.y1, box.x0 : box.x1]
    return pixels[np.ix_(_reflect(box.y0, box.y1, height), _reflect(box.x0, box.x1, width))]


def _reflect(start: int, stop: int, length: int) -> np.ndarray:
    if length == 1:
        return np.zeros(stop - start, dtype=np.intp)
    period = 2 * (length - 1)
    index = np.abs(np.arange(start, stop)) % period
    return np.where(index >= length, period - index, index)
