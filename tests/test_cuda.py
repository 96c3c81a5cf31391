"""The CUDA paths, with the real weights: fp16 channels_last tiles, pinned copies that overlap compute, recovery from
a real CUDA out-of-memory error, the engine's own tiling within 4 GiB, AuraSR's seeded noise on a GPU.

Skipped where torch sees no GPU; `make test` on a GPU host runs them.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from server import catalog
from server.config import Settings
from server.engine.executor import Counters, run_tiled
from server.engine.models import LoadedModel, load_model
from server.engine.runtime import LocalEngine
from server.engine.tiling import plan_tiles
from server.imaging import Picture
from tests import photos
from tests.engine_runs import run
from tests.test_executor import psnr
from tests.tiny_aura import write_tiny_aura

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CPU, GPU = torch.device("cpu"), torch.device("cuda")


class RealOutOfMemory:
    """Calls the model, but on call `fail_on` first asks the CUDA allocator for 256 TiB: a genuine OOM."""

    def __init__(self, model: LoadedModel, fail_on: int) -> None:
        self.model = model
        self.fail_on = fail_on
        self.calls = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on:
            torch.empty(1 << 48, dtype=torch.uint8, device=batch.device)
        return self.model(batch)


def test_x4plus_in_fp16_channels_last_tiles_matches_an_fp32_full_frame(weights_dir: Path) -> None:
    gpu = load_model("realesrgan-x4plus", weights_dir, GPU)
    assert gpu.dtype == torch.float16 and gpu.channels_last
    photo = photos.astronaut((192, 160))
    truth = run_tiled(photo, load_model("realesrgan-x4plus", weights_dir, CPU, "fp32"), tile=0)
    # 3×3 tiles of one window shape: three batches, the copies of each overlapping.
    tiled = run_tiled(photo, gpu, plan=plan_tiles((192, 160), 4, 64, gpu.spec, fixed_window=True), batch=3)
    assert tiled.shape == truth.shape == (640, 768, 3)
    assert psnr(truth, tiled) >= 45


def test_a_real_cuda_out_of_memory_halves_the_tile_and_gives_the_same_image(weights_dir: Path) -> None:
    anime = load_model("realesr-animevideov3-x4", weights_dir, GPU)
    photo = photos.astronaut((120, 90))
    clean = run_tiled(photo, anime, tile=40)
    forward, counters = RealOutOfMemory(anime, fail_on=5), Counters()
    recovered = run_tiled(photo, anime, tile=40, forward=forward, counters=counters)
    assert counters.oom_retries == 1 and forward.calls > 9
    assert psnr(clean, recovered) >= 45


def test_the_engine_runs_x4plus_at_its_own_tiling_in_under_4_gib(weights_dir: Path, tmp_path: Path) -> None:
    entry = catalog.find("realesrgan-x4plus")
    assert entry is not None
    engine = LocalEngine(Settings(weights_dir=weights_dir, data_dir=tmp_path, device="cuda", compile=False))
    try:
        torch.cuda.reset_peak_memory_stats()
        result = run(engine, entry, Picture(photos.astronaut((1024, 1024))), (4096, 4096))
        assert result.pixels.shape == (4096, 4096, 3)
        assert torch.cuda.max_memory_allocated() <= 4 << 30
    finally:
        asyncio.run(engine.close())


def test_aurasr_repeats_its_seed_on_the_gpu_and_agrees_with_the_cpu(tmp_path: Path) -> None:
    write_tiny_aura(tmp_path)
    gpu, cpu = load_model("aura-sr", tmp_path, GPU), load_model("aura-sr", tmp_path, CPU)
    assert gpu.dtype == torch.float32
    photo = photos.coffee((72, 40))
    first = run_tiled(photo, gpu, tile=64, batch=gpu.batch, seed=7)
    again = run_tiled(photo, gpu, tile=64, batch=gpu.batch, seed=7)
    assert np.array_equal(first, again)
    assert psnr(run_tiled(photo, cpu, tile=64, batch=cpu.batch, seed=7), first) >= 40
