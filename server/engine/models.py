"""Models on a device: spandrel loading, a per-device LRU cache, memory sizing, compilation.

Memory and speed figures are measured (an H100 with torch 2.11, and 2 CPU threads): an estimate
picks the tile size, and the executor's halve-on-OOM corrects it when the estimate was wrong.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import spandrel
import torch
import torch.nn.functional as F
from safetensors import safe_open

from server.engine import custom, precision
from server.engine.aura import SeededBatch
from server.engine.precision import Execution, PrecisionSetting
from server.engine.profiles import ArchProfile, ProfileStore, Traits, capabilities_of
from server.engine.tiling import TilingSpec, window_side
from server.engine.weights import MANIFEST, find_weights, load_descriptor, shown
from server.errors import ModelUnavailable

log = logging.getLogger(__name__)


# Convolution work per input pixel grows with the parameter count, so one rate per device kind
# covers both families: x4plus (16.7 M params) 128² in 5.3 s and animevideov3 (0.6 M) 240×160 in
# 0.39 s on 2 CPU threads (fp32 NCHW); 1024² in 0.305 s and 0.019 s on an H100 (fp16, channels_last, eager).
CPU_RATE_PER_THREAD = 2.6e10  # parameter·pixels per second, fp32 NCHW
CPU_SPEEDUP = {torch.float32: 1.2, torch.bfloat16: 2.6}  # channels_last, over that rate (x4plus, 2 EPYC cores)
CUDA_RATE = 4.0e13
# Over eager torch: max-autotune channels_last on the same H100; OpenVINO f32 over torch fp32 channels_last on
# 2 EPYC cores (x4plus 1.23×, animevideov3 1.25×).
BACKEND_SPEEDUP = {"torch": 1.0, "torch.compile": 1.5, "openvino": 1.24}

MAX_TILE_CUDA = 512
MAX_BATCH = {"cuda": 4, "cpu": 1}
TILE_CHOICES = (512, 384, 256, 192, 128, 96, 64, 48, 32, 16)
HEADROOM = {"cuda": 0.7, "cpu": 0.4}  # of free memory that one batch may use
_MEASURED = ProfileStore()  # when no store is given: measurements kept for this process only


@dataclass(frozen=True)
class CompiledForward:
    shape: tuple[int, ...] | None  # the one batch shape it was compiled for; None: any shape
    fn: Callable[[torch.Tensor], torch.Tensor]
    backend: str  # "torch.compile" or "openvino"


@dataclass(eq=False)
class LoadedModel:
    """A network on a device, ready to run. Immutable once built, except `compiled`, set once when ready."""

    weight_id: str
    descriptor: spandrel.ImageModelDescriptor
    device: torch.device
    execution: Execution
    scale: int  # what the weight delivers
    network_scale: int  # what the network itself does; a smaller `scale` is a bicubic resize after it
    profile: ArchProfile
    spec: TilingSpec
    params: int
    nbytes: int
    tile: int  # on a GPU the largest core side, fixed at load so that shapes stay fixed; 0 on the CPU: no cap
    batch: int  # windows per forward pass
    compiled: CompiledForward | None = None
    source: tuple[Path, custom.Version | None] | None = None  # a custom file, and the version of it loaded

    @property
    def stale(self) -> bool:
        """A custom file replaced (or removed) since it was loaded: the next job loads it again."""
        return self.source is not None and custom.version_of(self.source[0]) != self.source[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.execution.dtype

    @property
    def channels_last(self) -> bool:
        return self.execution.channels_last

    @property
    def batch_shape(self) -> tuple[int, int, int, int]:
        """The shape of a full batch of windows at the chosen tile: what gets compiled."""
        side = window_side(self.tile, self.spec)
        return self.batch, self.descriptor.input_channels, side, side

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1], model dtype and device → (N, 3, H·scale, W·scale) in [0, 1]."""
        if isinstance(batch, SeededBatch):
            output = self.descriptor.model(batch, noise=batch.style)  # AuraSR's style latent
        elif self.descriptor.input_channels == 1:
            output = _with_colour_back(batch, self._forward)
        else:
            output = self._forward(batch)
        if self.scale != self.network_scale:
            height, width = batch.shape[-2:]
            output = F.interpolate(output, size=(height * self.scale, width * self.scale), mode="bicubic",
                                   align_corners=False)
        return output.clamp_(0, 1)


    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        compiled = self.compiled
        if compiled is not None and compiled.shape in (None, tuple(batch.shape)):
            return compiled.fn(batch)
        return self.descriptor.model(batch)


def _with_colour_back(rgb: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A 1-channel network over the luma (BT.601 weights); the colour differences B−Y and R−Y are resampled to its
    output's size and put back. All but the network runs in fp32, so the round trip is exact to float precision,
    and a gray picture (no colour difference) comes back gray."""
    red, green, blue = rgb.float().unbind(1)
    luma = 0.299 * red + 0.587 * green + 0.114 * blue
    differences = torch.stack([blue - luma, red - luma], dim=1)
    out_luma = forward(luma[:, None].to(rgb.dtype).contiguous(memory_format=torch.channels_last)).float()[:, 0]
    blue_diff, red_diff = F.interpolate(differences, size=out_luma.shape[-2:], mode="bicubic",
                                        align_corners=False).unbind(1)
    out_blue, out_red = out_luma + blue_diff, out_luma + red_diff
    out_green = (out_luma - 0.299 * out_red - 0.114 * out_blue) / 0.587
    return torch.stack([out_red, out_green, out_blue], dim=1).to(rgb.dtype)


def execution_for(architecture: str, device: torch.device, setting: PrecisionSetting,
                  traits: Traits | None = None, native_bf16: bool | None = None) -> Execution:
    """How a network of `architecture` runs on `device`: from its profile, and what spandrel says of it if known.

    `native_bf16`: whether that device has bf16 arithmetic, for a device on another machine (None: detect it here).
    """
    return precision.choose(setting, device, capabilities_of(architecture, traits), native_bf16)


def fetch_hint(weight_id: str, weights_dir: Path) -> str:
    """The command that brings a weight into `weights_dir`, and what to do without internet."""
    if weight_id not in MANIFEST:
        return f"`loupe weights add FILE --name {weight_id.removeprefix(custom.PREFIX)}`"
    return f"`loupe weights pull {weight_id}` (or {offline_hint(weight_id, weights_dir)})"


def offline_hint(weight_id: str, weights_dir: Path) -> str:
    weight = MANIFEST.get(weight_id)
    if weight is None:
        return f"put its file back in {shown(weights_dir / custom.FOLDER, weights_dir)}"
    if weight.ncnn_stem is not None:
        return "`loupe weights import-ncnn` without internet"
    folder = shown(weight.official_path(weights_dir).parent, weights_dir)
    return f"place any {weight.architecture} .safetensors file in {folder}"


def locate(weight_id: str, weights_dir: Path) -> Path | None:
    """The file of a manifest weight or of a runnable custom model; None when it isn't there."""
    weight = custom.weight_file(weight_id, weights_dir)
    return find_weights(weight_id, weights_dir, manifest={weight_id: weight}) if weight is not None else None


def load_model(weight_id: str, weights_dir: Path, device: torch.device, setting: PrecisionSetting = "auto",
               profiles: ProfileStore | None = None) -> LoadedModel:
    """Load a manifest weight or a custom file onto `device`; a missing or broken file is a 503 that says how to
    fix it. A custom architecture is measured on first load (`profiles`: where measurements are kept)."""
    weight = custom.weight_file(weight_id, weights_dir)
    path = find_weights(weight_id, weights_dir, manifest={weight_id: weight}) if weight is not None else None
    version = custom.version_of(path) if path is not None else None  # before reading: a later change shows
    if weight is None or path is None:
        raise ModelUnavailable(f"the weights for {weight_id} are not in {shown(weights_dir, weights_dir)}: run "
                               f"{fetch_hint(weight_id, weights_dir)}", code="WEIGHTS_MISSING")
    try:
        descriptor = load_descriptor(path)
    except Exception as error:  # a truncated or foreign file fails in many ways; each means the same
        raise _corrupt(weight_id, weights_dir, path, str(error)) from error
    found = (descriptor.architecture.id, descriptor.scale)
    if found != (weight.architecture, weight.network_scale):
        raise _corrupt(weight_id, weights_dir, path, f"it holds a {found[0]} x{found[1]} network, "
                                                     f"not {weight.architecture} x{weight.network_scale}")
    channels = (descriptor.input_channels, descriptor.output_channels)
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or channels not in ((3, 3), (1, 1)):
        raise _corrupt(weight_id, weights_dir, path, "it is not an RGB or 1-channel image-to-image network")
    execution = execution_for(found[0], device, setting, Traits.of(descriptor))
    descriptor.to(device, execution.dtype).eval()
    if execution.channels_last:
        descriptor.model.to(memory_format=torch.channels_last)
    profile = (profiles or _MEASURED).profile(descriptor, device, execution.dtype, rate(device, execution.dtype),
                                              channels_last=execution.channels_last, built_in=weight_id in MANIFEST)
    spec = profile.tiling
    params = sum(p.numel() for p in descriptor.model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in (*descriptor.model.parameters(), *descriptor.model.buffers()))
    tile, batch = choose_tiling(profile, spec, execution.dtype, device, free_memory(device))
    source = None if weight_id in MANIFEST else (path, version)
    return LoadedModel(weight_id, descriptor, device, execution, weight.scale, weight.network_scale, profile, spec,
                       params, nbytes, tile, batch, source=source)


def _corrupt(weight_id: str, weights_dir: Path, path: Path, why: str) -> ModelUnavailable:
    return ModelUnavailable(f"the weights file {path.name} for {weight_id} can't be used ({why}): fetch it again with "
                            f"{fetch_hint(weight_id, weights_dir)}", code="WEIGHTS_CORRUPT")


def parameter_count(weight_id: str, weights_dir: Path) -> int | None:
    """Parameters of a weight file without loading it (safetensors header; else its size at 4 bytes each)."""
    path = locate(weight_id, weights_dir)
    if path is None:
        return None
    if path.suffix != ".safetensors":
        return path.stat().st_size // 4
    try:
        with safe_open(str(path), framework="pt") as handle:
            return sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys())
    except Exception:  # a broken file: loading it will say what is wrong
        return None


def _numel(shape: list[int]) -> int:
    count = 1
    for side in shape:
        count *= side
    return count


class ModelCache:
    """Loaded models of one device, least recently used first out once they exceed `budget` bytes."""

    def __init__(self, device: torch.device, weights_dir: Path, budget: int, setting: PrecisionSetting = "auto",
                 on_load: Callable[[LoadedModel], None] | None = None, profiles: ProfileStore | None = None) -> None:
        self.device = device
        self.profiles = profiles
        self.weights_dir = weights_dir
        self.budget = budget
        self.precision = setting
        self._on_load = on_load
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.loading_s = 0.0  # spent loading, in all: a job's run time less this is its compute

    def get(self, weight_id: str) -> LoadedModel:
        with self._lock:
            model = self._models.get(weight_id)
            if model is not None and not model.stale:
                self._models.move_to_end(weight_id)
                return model
            started = time.monotonic()
            model = load_model(weight_id, self.weights_dir, self.device, self.precision, self.profiles)
            self.loading_s += time.monotonic() - started
            self._models[weight_id] = model
            self._evict(keep=weight_id)
        if self._on_load is not None:
            self._on_load(model)
        return model

    def peek(self, weight_id: str) -> LoadedModel | None:
        with self._lock:
            model = self._models.get(weight_id)
        return model if model is not None and not model.stale else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(m.nbytes for m in self._models.values())

    def _evict(self, keep: str) -> None:
        evicted = False
        while sum(m.nbytes for m in self._models.values()) > self.budget and next(iter(self._models)) != keep:
            weight_id, _ = self._models.popitem(last=False)
            log.info("model cache on %s: unloaded %s to stay under %d bytes", self.device, weight_id, self.budget)
            evicted = True
        # A job still running on an evicted model keeps it alive until it ends; then its memory returns.
        if evicted and self.device.type == "cuda":
            torch.cuda.empty_cache()


def cache_budget(device: torch.device, vram_budget: int | None) -> int:
    """Bytes of weights a device's cache may hold: LOUPE_VRAM_BUDGET on a GPU, else a share of its memory."""
    if device.type == "cuda":
        if vram_budget is not None:
            return vram_budget
        return torch.cuda.get_device_properties(device).total_memory // 4
    return max(1 << 30, psutil.virtual_memory().total // 8)


def free_memory(device: torch.device) -> int:
    """Bytes a batch could use now: free device memory plus what torch's allocator holds unused; RAM on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available


def batch_bytes(profile: ArchProfile, dtype: torch.dtype, window: tuple[int, int], batch: int) -> int:
    """Estimated peak bytes of one forward pass over `batch` windows."""
    return profile.activations * dtype.itemsize * window[0] * window[1] * batch


def choose_tiling(profile: ArchProfile, spec: TilingSpec, dtype: torch.dtype, device: torch.device,
                  free: int) -> tuple[int, int]:
    """(largest core side, windows per pass) for a device, fixed at load time.

    On a GPU: the largest tile, then batch, whose forward pass fits in a share of `free` bytes, the
    batch stopping where the architecture's throughput stops growing. On the CPU no tile is fixed
    (0): each job's plan cuts the fewest tiles its memory allows. A grid's tile is its own.
    """
    most = (profile.max_batch or MAX_BATCH)[device.type]
    if device.type != "cuda" and not spec.grid:
        return 0, most
    usable = free * HEADROOM[device.type]
    if spec.grid:
        tile = spec.grid
    else:
        tile = next((t for t in TILE_CHOICES if t <= MAX_TILE_CUDA
                     and batch_bytes(profile, dtype, (window_side(t, spec),) * 2, 1) <= usable), TILE_CHOICES[-1])
    window = window_side(tile, spec)
    per_tile = batch_bytes(profile, dtype, (window, window), 1)
    if device.type == "cuda" and profile.saturating_pixels:
        most = min(most, max(1, profile.saturating_pixels // window**2))
    batch = int(max(1, min(most, usable // per_tile)))
    return tile, batch


def rate(device: torch.device, dtype: torch.dtype) -> float:
    """Parameter·pixels a second that eager torch delivers here for a network of work 1."""
    if device.type == "cuda":
        return CUDA_RATE
    return CPU_RATE_PER_THREAD * torch.get_num_threads() * CPU_SPEEDUP.get(dtype, 1.0)


def seconds_for(params: int, window_pixels: int, device: torch.device, dtype: torch.dtype, backend: str = "torch",
                work: float = 1.0) -> float:
    """A rough running time for `window_pixels` input pixels through a network of `params` parameters."""
    return work * params * window_pixels / (rate(device, dtype) * BACKEND_SPEEDUP[backend])


def compile_model(model: LoadedModel, cache_dir: Path) -> None:
    """Compile `model` for its full batch shape and make that its fast path. Takes minutes: run in the background.

    max-autotune without CUDA graphs: the graphs would be captured while a worker thread runs eager
    kernels on the same device, and their outputs are overwritten by the next call.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Inductor reads this at each cache lookup, so kernels and autotuning survive restarts. It is set
    # outright: importing spandrel already made inductor fill in its default under /tmp.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    fn = torch.compile(model.descriptor.model, mode="max-autotune-no-cudagraphs", dynamic=False)
    shape = model.batch_shape
    sample = torch.rand(shape, device=model.device).to(model.dtype)
    if model.channels_last:
        sample = sample.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fn(sample)
    model.compiled = CompiledForward(shape, fn, "torch.compile")
