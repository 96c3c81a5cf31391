"""One profile per architecture: what the engine knows about a network before and after loading it.

A profile is derived, not written by hand. From spandrel's descriptor come the size requirements,
fp16/bf16 support and how the architecture tiles (`SUPPORTED`, `DISCOURAGED`, `INTERNAL`: the last
runs untiled). What a descriptor can't say is measured once per network configuration, device kind and dtype,
on a small window, and kept (in memory, and in `profiles.json` under the data dir): the peak
activation memory per input pixel, and the compute per parameter·pixel against the rate the time
estimates use. `KNOWN` holds past measurements of the built-in networks, and
`OVERRIDES` holds only what no measurement can see: how much context a tile needs for no seam to
show, AuraSR's noise and native grid.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import spandrel
import torch
from spandrel import ModelTiling

from server.engine.precision import Capabilities
from server.engine.tiling import TilingSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchProfile:
    """What the engine knows about an architecture."""

    activations: int  # peak activation elements per window pixel at batch 1 (measured, with allocator slack)
    tiling: TilingSpec
    capabilities: Capabilities = Capabilities()
    work: float = 1.0  # compute per parameter·pixel, relative to the convolution nets the rates come from
    max_batch: dict[str, int] | None = None  # windows per pass by device kind; None: MAX_BATCH
    saturating_pixels: int | None = None  # window pixels per pass past which a GPU gains no throughput
    stochastic: bool = False  # samples noise in its forward pass: seeded per request, never compiled
    untiled: bool = False  # spandrel says it tiles internally (ModelTiling.INTERNAL): always one full frame
    fewest_tiles: bool = False  # spandrel discourages tiling it: the fewest tiles memory allows, on a GPU too


@dataclass(frozen=True)
class Traits:
    """What spandrel's descriptor says of one network, kept for planning before it is loaded."""

    multiple_of: int
    minimum: int
    tiling: ModelTiling
    half: bool
    bfloat16: bool

    @classmethod
    def of(cls, descriptor: spandrel.ModelDescriptor) -> Traits:
        requirements = descriptor.size_requirements
        return cls(requirements.multiple_of, requirements.minimum, descriptor.tiling, descriptor.supports_half,
                   descriptor.supports_bfloat16)


@dataclass(frozen=True)
class Override:
    """Facts about an architecture that a measurement can't see."""

    tiling: TilingSpec | None = None
    capabilities: Capabilities | None = None
    max_batch: dict[str, int] | None = None
    saturating_pixels: int | None = None
    stochastic: bool = False


# ESRGAN's receptive field is wide: 48-px tiles of x4plus match a full frame at 48 dB with 32 px of context, 40 dB
# with 24 and 37 dB with 16. On an H100 it delivers 44, 53 and 55 output MP/s at 256², 512² and 1024² (fp16,
# channels_last): past one 512² window a bigger batch only costs memory. Compact: 74 dB with 16 px of context.
# AuraSR (618 M parameters, fp32 only) runs on its native 64-px grid, batched (its convolutions are grouped per
# window, so a batch costs no more than its windows); batches on the CPU stay small, as cancellation and progress
# wait for a whole batch. Its 5-D modulated conv weights have no channels_last layout; its noise is drawn per request.
OVERRIDES: dict[str, Override] = {
    "ESRGAN": Override(tiling=TilingSpec(context=32, blend=16), saturating_pixels=512 * 512),
    "Compact": Override(tiling=TilingSpec(context=16, blend=8)),
    "AuraSR": Override(tiling=TilingSpec(context=0, blend=0, grid=64, shifted_pass=True),
                       capabilities=Capabilities(half=False, bfloat16=False, fp32_only=True, channels_last=False),
                       max_batch={"cuda": 16, "cpu": 4}, stochastic=True),
}
# Networks of unknown reach get a generous context: transformers (SwinIR, HAT, DAT) see across whole windows.
DEFAULT_TILING = TilingSpec(context=32, blend=16)


@dataclass(frozen=True)
class Measured:
    activations: int  # elements per input pixel
    work: float


# Past measurements (2 CPU threads, fp32 and bf16; an H100 in fp16): ESRGAN 13 KB per input pixel in fp32 on the
# CPU, 8.6 GiB for a 1024² frame in fp16; Compact under 1.4 KB per input pixel in fp32; AuraSR about 320 MB per
# 64-px window, 14 s per window on 2 threads.
KNOWN: dict[str, Measured] = {
    "ESRGAN": Measured(4400, 1.0),
    "Compact": Measured(400, 1.0),
    "AuraSR": Measured(24000, 0.3),
}


def capabilities_of(architecture: str, traits: Traits | None) -> Capabilities:
    """The precisions and layout an architecture runs in: its override, narrowed by what spandrel says it supports."""
    override = OVERRIDES.get(architecture, Override())
    capabilities = override.capabilities or Capabilities()
    if traits is not None:
        capabilities = dataclasses.replace(capabilities, half=capabilities.half and traits.half,
                                           bfloat16=capabilities.bfloat16 and traits.bfloat16)
    return capabilities


def profile_of(architecture: str, measured: Measured | None = None, traits: Traits | None = None) -> ArchProfile:
    """The profile from the facts at hand; before any measurement, a conservative guess."""
    override = OVERRIDES.get(architecture, Override())
    facts = measured or KNOWN.get(architecture) or Measured(8000, 4.0)
    tiling = override.tiling or DEFAULT_TILING
    if traits is not None:
        tiling = dataclasses.replace(tiling, multiple_of=traits.multiple_of, minimum=traits.minimum)
    return ArchProfile(
        activations=facts.activations,
        tiling=tiling,
        capabilities=capabilities_of(architecture, traits),
        work=facts.work,
        max_batch=override.max_batch,
        saturating_pixels=override.saturating_pixels,
        stochastic=override.stochastic,
        untiled=traits is not None and traits.tiling == ModelTiling.INTERNAL,
        fewest_tiles=traits is not None and traits.tiling == ModelTiling.DISCOURAGED,
    )


class ProfileStore:
    """Measurements per (architecture, device kind, dtype), made once and kept in `path` (None: memory only)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._measured: dict[str, Measured] = {}
        if path is not None and path.is_file():
            try:
                self._measured = {key: Measured(**value) for key, value in json.loads(path.read_text()).items()}
            except (OSError, ValueError, TypeError, AttributeError):
                log.warning("ignoring an unreadable %s; networks will be measured again", path)

    def profile(self, descriptor: spandrel.ImageModelDescriptor, device: torch.device, dtype: torch.dtype,
                rate: float, *, channels_last: bool, built_in: bool) -> ArchProfile:
        """The profile of a loaded network: a built-in weight's from `KNOWN`; any other measured on first sight of
        its configuration (architecture, scale, size) on this device kind and dtype, since a wider or deeper
        network of the same architecture needs more memory a pixel.

        `rate`: parameter·pixels a second that the time estimates assume here, for work = 1.
        """
        architecture = descriptor.architecture.id
        traits = Traits.of(descriptor)
        if built_in and architecture in KNOWN:
            return profile_of(architecture, KNOWN[architecture], traits)
        params = sum(p.numel() for p in descriptor.model.parameters())
        key = self.key(architecture, descriptor.scale, params, device, dtype)
        with self._lock:
            measured = self._measured.get(key)
        if measured is None:  # measured outside the lock: planning on other devices never waits for it
            try:
                measured = measure(descriptor, device, dtype, rate, channels_last)
            except Exception:  # an op this dtype lacks, say: the request will tell; plan with the guess
                log.exception("could not measure %s on %s; planning with a guess", architecture, device.type)
                return profile_of(architecture, None, traits)
            log.info("measured %s on %s: %d activation elements per pixel, work %.2f", architecture, device.type,
                     measured.activations, measured.work)
            with self._lock:
                measured = self._measured.setdefault(key, measured)
                self._save()
        return profile_of(architecture, measured, traits)

    def lookup(self, architecture: str, scale: int, params: int, device: torch.device,
               dtype: torch.dtype) -> Measured | None:
        """A measurement made already, for planning before the network is loaded."""
        with self._lock:
            return self._measured.get(self.key(architecture, scale, params, device, dtype))

    @staticmethod
    def key(architecture: str, scale: int, params: int, device: torch.device, dtype: torch.dtype) -> str:
        return f"{architecture}/x{scale}/{params}/{device.type}/{str(dtype).removeprefix('torch.')}"

    def _save(self) -> None:
        if self.path is None:
            return
        text = json.dumps({key: dataclasses.asdict(value) for key, value in self._measured.items()}, indent=1)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=self.path.parent, prefix=".profiles-", suffix=".json")
            with os.fdopen(handle, "w") as out:
                out.write(text)
            os.replace(name, self.path)
        except OSError as error:  # measured again after a restart, nothing worse
            log.warning("could not keep the measurements in %s: %s", self.path, error)


_PROBE_SIDE = 64
_TIMED_RUNS = 3


def probe_side(descriptor: spandrel.ImageModelDescriptor) -> int:
    """A small window side the network takes."""
    requirements = descriptor.size_requirements
    side = max(_PROBE_SIDE, requirements.minimum)
    return math.ceil(side / requirements.multiple_of) * requirements.multiple_of


def measure(descriptor: spandrel.ImageModelDescriptor, device: torch.device, dtype: torch.dtype,
            rate: float, channels_last: bool = False) -> Measured:
    """Peak activation memory and the time of one forward pass over a small window, on the loaded network."""
    side = probe_side(descriptor)
    sample = torch.rand(1, descriptor.input_channels, side, side, device=device).to(dtype)
    if channels_last:
        sample = sample.contiguous(memory_format=torch.channels_last)  # as the executor feeds it
    params = sum(p.numel() for p in descriptor.model.parameters())
    with torch.inference_mode():
        descriptor.model(sample)  # warm-up: first-call allocations and kernel selection
        peak = _peak_bytes(lambda: descriptor.model(sample), device)
        times = []
        for _ in range(_TIMED_RUNS):
            started = time.perf_counter()
            descriptor.model(sample)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
    activations = math.ceil(1.25 * peak / (dtype.itemsize * side * side))  # with the allocator's slack
    work = statistics.median(times) * rate / max(1, params * side * side)
    return Measured(max(1, activations), min(50.0, max(0.05, work)))


def _peak_bytes(forward: object, device: torch.device) -> int:
    """The most memory live at once during `forward()` beyond what was live before it."""
    assert callable(forward)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        forward()
    live = peak = 0
    # Kineto's raw memory events: +bytes allocated, -bytes freed, in time order.
    changes = [e for e in recorded.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(changes, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
