"""Runs a tile plan on a device, with bounded host memory.

The input and the output stay on the host; only batches of tile windows travel to the device.
The output is written in its final dtype: tiles add into a float32 band of the rows not yet
final, kept on the device, and rows leave the band, quantized there, as soon as no pending tile
reaches them. From a GPU only final 8- or 16-bit rows travel back.

On CUDA each batch's forward pass is queued (pinned upload, forward) before the host waits for
the previous batch and writes out its final rows, so the GPU always has work queued. When a forward pass
runs out of memory, the executor frees the cache, halves the tile and re-plans what is left
from the failed tile on: finished tiles are never run again. A grid plan (AuraSR) keeps its
native tile and halves the batch instead.

A model that samples noise (AuraSR) gets it drawn from the job's seed for each batch's windows.
"""
from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from server.engine.aura import SeededNoise
from server.engine.models import LoadedModel
from server.engine.tiling import Box, Plan, Tile, TilingSpec, plan_remaining, plan_tiles
from server.errors import Cancelled, OutOfDeviceMemory

log = logging.getLogger(__name__)

MIN_TILE = 16
_FLUSH_ROWS = 64  # rows quantized at a time, bounding the temporaries

Forward = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


@dataclass
class Counters:
    """What a device worker has done; written only by its own thread."""

    tiles: int = 0
    oom_retries: int = 0


def run_tiled(
    pixels: np.ndarray,
    model: LoadedModel,
    *,
    tile: int | None = None,
    plan: Plan | None = None,
    batch: int = 1,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    counters: Counters | None = None,
    forward: Forward | None = None,
    spec: TilingSpec | None = None,
    seed: int | None = None,
) -> np.ndarray:
    """Upscale H×W×3 uint8 or uint16 `pixels` by `model.scale`; the result has their dtype.

    Either `plan` (a job plan's pass) or `tile`, the largest core side (0: one full-frame pass; on a
    GPU, windows of one fixed shape). `forward` replaces the call of the model (by default the
    model itself). `progress` gets (tiles done, tiles in all) after each batch. `spec` replaces the
    model's tiling spec. A model that samples noise draws it from `seed` (None: a random one); other
    models ignore it.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected H×W×3 uint8 or uint16 pixels, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    if plan is None:
        if tile is None:
            raise ValueError("run_tiled needs a plan or a tile size")
        plan = plan_tiles((width, height), model.scale, tile, spec or model.spec,
                          fixed_window=model.device.type == "cuda")
    elif plan.size != (width, height) or plan.scale != model.scale:
        raise ValueError(f"a plan for {plan.size} ×{plan.scale}, given {width}x{height} pixels and a ×{model.scale} "
                         "model")
    noise = None
    if model.profile.stochastic:
        noise = SeededNoise(secrets.randbits(63) if seed is None else seed, model.descriptor.model)
    run = _Run(pixels, model, forward or model, max(1, batch), counters or Counters(), noise)
    return run.execute(plan, cancel, progress)


def band_bytes(rows: int, width: int) -> int:
    """The float band for `rows` output rows `width` wide: float32 RGB and weight sums, 16 bytes a pixel."""
    return 16 * rows * width


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


@dataclass
class _Launched:
    """A batch on its way: blended into the band once `ready`."""

    plan: Plan
    last: int  # index of its last tile in `plan`
    tiles: tuple[Tile, ...]
    ready: torch.cuda.Event | None


@dataclass
class _Outputs:
    """A batch's forward pass done: what each of its tiles adds to the band, not added yet."""

    tiles: tuple[Tile, ...]
    crops: list[torch.Tensor]  # (3, rows, columns) in the model's dtype
    weights: list[torch.Tensor]  # (rows, columns) float32


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
        self.band = _Band(self.out, self.maxval, model.device)
        self.cuda = model.device.type == "cuda"
        self.ramps: dict[int, tuple[np.ndarray, torch.Tensor]] = {}
        self.done = 0

    def execute(self, plan: Plan, cancel: threading.Event | None, progress: Progress | None) -> np.ndarray:
        index, pending = 0, None
        while index < len(plan.tiles):
            if cancel is not None and cancel.is_set():
                raise Cancelled("the job was cancelled")
            group = _batch_at(plan.tiles, index, self.batch)
            try:
                outputs, failure = self._run_forward(plan, group), None
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                # Without its traceback the error no longer pins the failed batch's tensors.
                outputs, failure = None, error.with_traceback(None)
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
            # The batch before lands only now, behind this one's forward pass, and leaves the band before
            # this one enters it: the band holds one row of tiles, and the device always has work queued.
            if pending is not None:
                self._land(pending, pending.plan.flush_after[pending.last], progress, len(plan.tiles) - index)
            assert outputs is not None
            pending = self._blend(plan, index, outputs)
            index += len(group)
        if pending is not None:
            self._land(pending, pending.plan.flush_after[pending.last], progress, 0)
        self.band.flush(self.out.shape[0])
        return self.out

    def _shrink(self, plan: Plan, failed: int, error: RuntimeError) -> Plan:
        tile = plan.tile // 2
        if tile < MIN_TILE:
            raise self._out_of_memory(f"even with {plan.tile}-pixel tiles") from error
        self.counters.oom_retries += 1
        if self.cuda:
            torch.cuda.empty_cache()
        log.warning("%s ran out of memory with %d-px tiles; going on from tile %d with %d-px tiles",
                    self.model.device, plan.tile, failed, tile)
        return plan_remaining(plan, failed, tile)

    def _halve_batch(self, plan: Plan, error: RuntimeError) -> None:
        """Out of memory on a grid plan: the tile is the model's own, so fewer windows go at a time."""
        if self.batch == 1:
            raise self._out_of_memory(f"even one {plan.tile}-pixel tile at a time") from error
        self.counters.oom_retries += 1
        if self.cuda:
            torch.cuda.empty_cache()
        log.warning("%s ran out of memory with batches of %d; going on with %d", self.model.device, self.batch,
                    self.batch // 2)
        self.batch //= 2

    @torch.inference_mode()
    def _run_forward(self, plan: Plan, group: tuple[Tile, ...]) -> _Outputs:
        """The forward pass, before anything changes: an out-of-memory error here can be resumed."""
        windows = np.stack([_read(self.pixels, t.window) for t in group])
        batch = self._upload(windows)
        if self.noise is not None:
            batch = self.noise.attach(batch, [t.window for t in group])
        compiled = self.model.compiled
        if (compiled is not None and compiled.shape is not None and len(group) < compiled.shape[0]
                and tuple(batch.shape[1:]) == compiled.shape[1:]):
            # A short last batch padded to the compiled shape still beats an eager pass.
            batch = torch.cat([batch, batch[-1:].expand(compiled.shape[0] - len(group), -1, -1, -1)])
        result = self.forward(batch)
        crops, weights = [], []
        for i, t in enumerate(group):
            rows, cols = plan.crop(t)
            crops.append(result[i, :, rows, cols])
            weights.append(self._on_device(t.weight_y).view(-1, 1) * self._on_device(t.weight_x).view(1, -1))
        return _Outputs(group, crops, weights)

    def _blend(self, plan: Plan, index: int, outputs: _Outputs) -> _Launched:
        # Rows before this batch were flushed for this plan: an out-of-memory error can't re-plan it now.
        with self._fatal_out_of_memory("while blending its tiles"):
            self.band.reserve(max(t.paste.y1 for t in outputs.tiles))
            self.band.add(outputs)
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()
        return _Launched(plan, index + len(outputs.tiles) - 1, outputs.tiles, ready)

    def _out_of_memory(self, how: str) -> OutOfDeviceMemory:
        return OutOfDeviceMemory(f"{self.model.device} ran out of memory running {self.model.weight_id} {how}; retry "
                                 "later or on a larger device")

    @contextlib.contextmanager
    def _fatal_out_of_memory(self, how: str) -> Iterator[None]:
        """Turns an out-of-memory error inside into the 503 it ends in; other errors pass unchanged."""
        try:
            yield
        except RuntimeError as error:
            if is_out_of_memory(error):
                raise self._out_of_memory(how) from error
            raise

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

    def _land(self, launched: _Launched, final_rows: int, progress: Progress | None, waiting: int) -> None:
        if launched.ready is not None:
            launched.ready.synchronize()
        with self._fatal_out_of_memory("while writing out finished rows"):
            self.band.flush(final_rows)
        self.done += len(launched.tiles)
        self.counters.tiles += len(launched.tiles)
        if progress is not None:
            progress(self.done, self.done + waiting)


class _Band:
    """Sums of weighted RGB and of weights, on the device, for the output rows that are not final yet.

    Output row `top` is buffer row `start`; `rows` rows from there are in use. Rows are zeroed as they
    come into use, so flushing only moves `start` on, and rows move back to the front only when the
    buffer's end is reached.
    """

    def __init__(self, out: np.ndarray, maxval: float, device: torch.device) -> None:
        self.out = out
        self.maxval = maxval
        self.device = device
        # 16-bit rows leave the device as int32: CUDA kernels for uint16 are few.
        self.quantized = torch.uint8 if out.dtype == np.uint8 else torch.int32
        self.top = 0  # first row not yet written to `out`
        self.start = 0
        self.rows = 0
        self.rgb = torch.empty((0, out.shape[1], 3), device=device)
        self.weight = torch.empty((0, out.shape[1], 1), device=device)

    def reserve(self, until: int) -> None:
        """Make room for rows up to `until` (exclusive)."""
        needed = until - self.top
        if needed <= self.rows:
            return
        capacity = len(self.rgb)
        if self.start + needed > capacity:
            kept = slice(self.start, self.start + self.rows)
            if needed > capacity:  # grown by a quarter at least: the next tile row needs a little more
                capacity = max(needed, capacity + capacity // 4)
                rgb = torch.empty((capacity, *self.rgb.shape[1:]), device=self.device)
                weight = torch.empty((capacity, *self.weight.shape[1:]), device=self.device)
                rgb[: self.rows], weight[: self.rows] = self.rgb[kept], self.weight[kept]
                self.rgb, self.weight = rgb, weight
            else:
                for buffer in (self.rgb, self.weight):
                    rest = buffer[kept]
                    buffer[: self.rows] = rest.clone() if self.rows > self.start else rest  # never onto itself
            self.start = 0
        fresh = slice(self.start + self.rows, self.start + needed)
        self.rgb[fresh].zero_()
        self.weight[fresh].zero_()
        self.rows = needed

    @torch.inference_mode()
    def add(self, outputs: _Outputs) -> None:
        for t, crop, weight in zip(outputs.tiles, outputs.crops, outputs.weights):
            if t.paste.y0 < self.top:
                raise AssertionError(f"a tile reaches row {t.paste.y0}, already final up to {self.top}")
            offset = self.start - self.top
            rows, cols = slice(t.paste.y0 + offset, t.paste.y1 + offset), slice(t.paste.x0, t.paste.x1)
            self.rgb[rows, cols].addcmul_(crop.permute(1, 2, 0), weight[..., None])
            self.weight[rows, cols] += weight[..., None]

    @torch.inference_mode()
    def flush(self, until: int) -> None:
        """Quantize rows up to `until` (exclusive) into the output and drop them from the band."""
        count = min(until - self.top, self.rows)
        if count <= 0:
            return
        for first in range(0, count, _FLUSH_ROWS):
            last = min(count, first + _FLUSH_ROWS)
            rows = slice(self.start + first, self.start + last)
            values = self.rgb[rows] * (self.maxval / self.weight[rows])
            values = values.add_(0.5).clamp_(0, self.maxval).to(self.quantized)
            target = self.out[self.top + first : self.top + last]
            if self.quantized == torch.uint8:
                torch.from_numpy(target).copy_(values)
            else:
                target[:] = values.cpu().numpy()
        self.top += count
        self.start += count
        self.rows -= count


def _batch_at(tiles: tuple[Tile, ...], start: int, most: int) -> tuple[Tile, ...]:
    """Up to `most` tiles from `start` whose windows share one shape, so that they stack into one batch."""
    first = tiles[start].window
    end = start + 1
    while end < min(len(tiles), start + most) and (tiles[end].window.width, tiles[end].window.height) == (
            first.width, first.height):
        end += 1
    return tiles[start:end]


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
