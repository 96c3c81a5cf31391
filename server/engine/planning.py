"""One plan per local job: what the dry run reports, what progress counts and what the executor runs.

`plan_job` is pure: it takes a picture's facts and each weight's `ModelFacts` (from the loaded
model, or from its profile and file header when it isn't loaded) and returns the `JobPlan`:
the passes, the tiles of each pass, the precision and layout, the executed model and the
estimates.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from server.catalog import LocalSpec
from server.engine.executor import band_bytes
from server.engine.models import HEADROOM, ArchProfile, batch_bytes, seconds_for
from server.engine.pipeline import constant_alpha, model_input_size, model_runs, plan_passes
from server.engine.precision import Execution
from server.engine.tiling import Plan, TilingSpec, fewest_tiles, plan_tiles
from server.imaging import Picture


@dataclass(frozen=True)
class ModelFacts:
    """What planning needs to know about one weight on one device."""

    weight_id: str
    profile: ArchProfile
    spec: TilingSpec  # as configured (LOUPE_AURA_OVERLAP applied)
    execution: Execution
    params: int
    nbytes: int
    tile: int  # the device's largest core side (0: none, the CPU)
    batch: int
    backend: str  # "torch", or what compiled it: "torch.compile", "openvino"


@dataclass(frozen=True)
class PictureFacts:
    """What planning needs to know about the picture: from the decoded pixels, or the worst case its header allows."""

    width: int
    height: int
    channels: int
    constant_alpha: bool  # alpha is the same everywhere: one model run per pass, not two

    @classmethod
    def of(cls, picture: Picture) -> PictureFacts:
        return cls(picture.width, picture.height, picture.channels, constant_alpha(picture) is not None)

    @classmethod
    def from_header(cls, width: int, height: int, alpha: bool) -> PictureFacts:
        """Before decoding: an alpha channel is taken to vary (two model runs a pass) until the pixels say not."""
        return cls(width, height, 4 if alpha else 3, False)


@dataclass(frozen=True)
class PassPlan:
    scale: int
    weight_id: str
    input_size: tuple[int, int]
    tiles: Plan
    batch: int
    execution: Execution
    backend: str
    runs: int  # model runs over this pass's input: 2 for a varying alpha (over black, over white)
    seconds: float  # for all its runs
    peak_device_bytes: int
    peak_host_bytes: int

    @property
    def output_size(self) -> tuple[int, int]:
        return self.tiles.output_size


@dataclass(frozen=True)
class JobPlan:
    model: str  # the catalog id
    source_size: tuple[int, int]  # the picture's; the first pass's input may be smaller (see model_input_size)
    device: torch.device
    device_name: str
    target: tuple[int, int]
    passes: tuple[PassPlan, ...]
    images: int  # distinct images computed: `n` for a model that samples noise (one seed each), else 1

    @property
    def executed_model(self) -> str:
        return "local/" + "+".join(p.weight_id for p in self.passes)

    @property
    def model_runs(self) -> int:
        """Model runs for one image."""
        return sum(p.runs for p in self.passes)

    @property
    def tiles_per_image(self) -> int:
        return sum(p.runs * len(p.tiles.tiles) for p in self.passes)

    @property
    def estimated_seconds(self) -> float:
        return self.images * sum(p.seconds for p in self.passes)

    def describe(self) -> dict[str, Any]:
        """The dry run's `plan`."""
        return {
            "device": str(self.device),
            "device_name": self.device_name,
            "precision": ", ".join(sorted({p.execution.precision for p in self.passes})),
            "layout": ", ".join(sorted({p.execution.layout for p in self.passes})),
            "executed_model": self.executed_model,
            "input": list(self.source_size),
            "passes": [
                {"scale": p.scale, "weights": p.weight_id, "input": list(p.input_size), "output": list(p.output_size),
                 "precision": p.execution.precision, "layout": p.execution.layout, "backend": p.backend,
                 "tile": p.tiles.tile, "batch": p.batch, "tiles": len(p.tiles.tiles),
                 "window": list(p.tiles.window), "window_pixels": p.tiles.window_pixels, "model_runs": p.runs}
                for p in self.passes
            ],
            "images": self.images,
            "model_runs": self.images * self.model_runs,
            "tiles": self.images * self.tiles_per_image,
            "estimated_peak_device_bytes": max(p.peak_device_bytes for p in self.passes),
            "estimated_peak_host_bytes": max(p.peak_host_bytes for p in self.passes),
            "estimated_seconds": round(self.estimated_seconds, 2),
        }


def plan_job(model: str, local: LocalSpec, picture: PictureFacts, target: tuple[int, int], n: int, *,
             device: torch.device, device_name: str, facts: Callable[[str], ModelFacts], free_memory: int,
             tile_size: int | None, max_side: int) -> JobPlan:
    """The plan of one local job. `tile_size` is LOUPE_TILE_SIZE (None: planned from `free_memory`); `max_side`
    is LOUPE_MAX_OUTPUT_SIDE, which bounds the passes' intermediate sizes too."""
    source = (picture.width, picture.height)
    scales = plan_passes(max(target[0] / picture.width, target[1] / picture.height), local.native_scales)
    runs = model_runs(picture.channels, picture.constant_alpha, scales) // len(scales)
    passes: list[PassPlan] = []
    size = model_input_size(source, target, scales, max_side)
    stochastic = False
    on_gpu = device.type == "cuda"
    for scale in scales:
        weight = facts(local.weights[scale])
        stochastic = stochastic or weight.profile.stochastic
        tiles = _plan_tiles_for(size, scale, weight, device, free_memory, tile_size)
        batch = min(weight.batch, len(tiles.tiles))
        band = band_bytes(tiles.window[1] * scale, tiles.output_size[0])
        activations = batch_bytes(weight.profile, weight.execution.dtype, tiles.window, batch)
        seconds = runs * seconds_for(weight.params, tiles.window_pixels, device, weight.execution.dtype,
                                     weight.backend, weight.profile.work)
        passes.append(PassPlan(scale, weight.weight_id, size, tiles, batch, weight.execution, weight.backend, runs,
                               seconds, weight.nbytes + activations + (band if on_gpu else 0),
                               _image_bytes(tiles) + (0 if on_gpu else band)))
        size = tiles.output_size
    return JobPlan(model, source, device, device_name, target, tuple(passes), n if stochastic else 1)


def _plan_tiles_for(size: tuple[int, int], scale: int, weight: ModelFacts, device: torch.device, free_memory: int,
                   tile_size: int | None) -> Plan:
    """The tiles of one pass: LOUPE_TILE_SIZE when set. Else, on a GPU, fixed windows of the tile chosen at load:
    cuDNN tunes, and torch.compile compiles, for one shape. Else the fewest tiles whose forward pass and float
    band fit in a share of the memory free now: a full frame where it fits."""
    spec = weight.spec
    if spec.grid:
        return plan_tiles(size, scale, spec.grid, spec)
    if weight.profile.untiled:  # it tiles inside itself: one full frame
        return plan_tiles(size, scale, 0, spec)
    if tile_size is not None:
        return plan_tiles(size, scale, tile_size, spec, fixed_window=device.type == "cuda" and tile_size > 0)
    if device.type == "cuda" and not weight.profile.fewest_tiles:
        return plan_tiles(size, scale, weight.tile, spec, fixed_window=True)
    usable = free_memory * HEADROOM[device.type]

    def fits(width: int, height: int) -> bool:
        activations = batch_bytes(weight.profile, weight.execution.dtype, (width, height), weight.batch)
        return activations + band_bytes(height * scale, size[0] * scale) <= usable

    return plan_tiles(size, scale, fewest_tiles(size, spec, fits), spec)


def _image_bytes(plan: Plan) -> int:
    """The 8-bit input and output of one model run, on the host."""
    out_width, out_height = plan.output_size
    return 3 * (plan.size[0] * plan.size[1] + out_width * out_height)
