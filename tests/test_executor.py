"""The tile executor on the CPU: no seams, out-of-memory recovery, cancellation, progress, odd inputs."""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from server.engine import executor
from server.engine.executor import Counters, run_tiled
from server.errors import Cancelled
from server.engine.models import LoadedModel, load_model
from server.engine.tiling import plan_remaining, plan_tiles
from server.api.errors import status_of
from server.errors import LoupeError
from tests import photos
from tests.tiny_models import tiny_model

CPU = torch.device("cpu")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    peak = float(np.iinfo(a.dtype).max)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


@pytest.fixture(scope="module")
def anime(weights_dir: Path) -> LoadedModel:
    return load_model("realesr-animevideov3-x4", weights_dir, CPU)


class CountingForward:
    """Calls the model, counting calls and the shapes seen; raises out-of-memory on the calls listed in `fail_on`."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], fail_on: set[int] | None = None,
                 error: Exception | None = None) -> None:
        self.model = model
        self.fail_on = fail_on or set()
        self.error = error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.shapes.append(tuple(batch.shape))
        if self.calls in self.fail_on:
            raise self.error
        return self.model(batch)


def test_48_pixel_tiles_match_one_full_frame_pass_animevideov3(anime: LoadedModel) -> None:
    photo = photos.coffee((160, 112))
    full = run_tiled(photo, anime, tile=0)
    tiled = run_tiled(photo, anime, tile=48)
    assert full.shape == tiled.shape == (448, 640, 3)
    assert psnr(full, tiled) >= 45


@pytest.mark.slow
def test_48_pixel_tiles_match_one_full_frame_pass_x4plus(weights_dir: Path) -> None:
    x4plus = load_model("realesrgan-x4plus", weights_dir, CPU)
    photo = photos.astronaut((64, 64))
    full = run_tiled(photo, x4plus, tile=0)
    tiled = run_tiled(photo, x4plus, tile=48)
    assert psnr(full, tiled) >= 45


def test_a_full_frame_is_one_bare_pass_of_the_network(anime: LoadedModel) -> None:
    """At the image's border the executor does what the network does over the whole image: no padding of its own."""
    photo = photos.coffee((96, 64)).copy()
    ours = run_tiled(photo, anime, tile=0)
    with torch.inference_mode():
        batch = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
        batch = batch.to(anime.dtype).contiguous(memory_format=torch.channels_last)
        bare = (anime(batch)[0].float().permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.abs(ours.astype(int) - bare).max() <= 1


def test_border_tiles_see_the_border_as_a_full_frame_does(anime: LoadedModel) -> None:
    photo = photos.coffee((160, 112))
    full = run_tiled(photo, anime, tile=0)
    tiled = run_tiled(photo, anime, tile=48)
    border = np.ones(full.shape[:2], bool)
    border[32:-32, 32:-32] = False  # 32 output pixels in from the image's own border
    assert psnr(full[border], tiled[border]) >= 45


def test_x2_weights_run_the_x4_network_then_resize(weights_dir: Path) -> None:
    x2 = load_model("realesr-animevideov3-x2", weights_dir, CPU)
    photo = photos.chelsea((90, 60))
    full = run_tiled(photo, x2, tile=0)
    tiled = run_tiled(photo, x2, tile=32)
    assert full.shape == (120, 180, 3)
    assert psnr(full, tiled) >= 45


def test_out_of_memory_halves_the_tile_and_resumes_from_the_failed_tile(anime: LoadedModel) -> None:
    photo = photos.astronaut((120, 90))
    plan = plan_tiles((120, 90), 4, 40, anime.spec)
    assert len(plan.tiles) == 9
    clean = run_tiled(photo, anime, tile=40)

    forward = CountingForward(anime, fail_on={5})
    counters = Counters()
    recovered = run_tiled(photo, anime, tile=40, forward=forward, counters=counters)

    # Calls 1-4 succeeded and are kept; call 5 failed; then only what was left, with 20-px tiles.
    resumed = plan_remaining(plan, 4, 20)
    assert forward.calls == 5 + len(resumed.tiles)
    assert forward.calls < 5 + len(plan_tiles((120, 90), 4, 20, anime.spec).tiles)
    assert forward.shapes[5:] == [(1, 3, t.window.height, t.window.width) for t in resumed.tiles]
    assert counters.oom_retries == 1 and counters.tiles == 4 + len(resumed.tiles)
    assert psnr(clean, recovered) >= 45


def test_a_runtime_error_saying_out_of_memory_counts_as_one(anime: LoadedModel) -> None:
    photo = photos.coffee((64, 64))
    forward = CountingForward(anime, fail_on={1}, error=RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    counters = Counters()
    result = run_tiled(photo, anime, tile=64, forward=forward, counters=counters)
    assert result.shape == (256, 256, 3) and counters.oom_retries == 1


def test_out_of_memory_at_the_smallest_tile_gives_up_with_a_clear_error(anime: LoadedModel) -> None:
    photo = photos.coffee((40, 40))
    forward = CountingForward(anime, fail_on=set(range(1, 1000)))
    with pytest.raises(LoupeError) as raised:
        run_tiled(photo, anime, tile=40, forward=forward)
    assert status_of(raised.value) == 503 and raised.value.code == "DEVICE_OUT_OF_MEMORY"
    assert "even with 20-pixel tiles" in raised.value.message
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)
    assert forward.calls == 2  # 40 px, then 20 px; 10 px is below the minimum


def test_out_of_memory_once_tiles_are_blending_is_a_clear_error_not_a_retry(anime: LoadedModel,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows may already be final for the current plan then: re-planning would blend tiles twice."""
    reserve = executor._Band.reserve
    calls: list[int] = []

    def failing(band: executor._Band, until: int) -> None:
        calls.append(until)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 300.00 MiB")
        reserve(band, until)

    monkeypatch.setattr(executor._Band, "reserve", failing)
    forward = CountingForward(anime)
    with pytest.raises(LoupeError) as raised:
        run_tiled(photos.coffee((96, 96)), anime, tile=32, forward=forward)
    assert status_of(raised.value) == 503 and raised.value.code == "DEVICE_OUT_OF_MEMORY"
    assert "blending" in raised.value.message and forward.calls == 3


def test_the_float_band_holds_about_one_row_of_tiles(anime: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    rows: list[int] = []
    reserve = executor._Band.reserve

    def watched(band: executor._Band, until: int) -> None:
        reserve(band, until)
        rows.append(len(band.rgb))

    monkeypatch.setattr(executor._Band, "reserve", watched)
    photo = photos.coffee((64, 256))  # 8 rows of 32-px tiles: 128 output rows each
    assert run_tiled(photo, anime, tile=32).shape == (1024, 256, 3)
    assert len(rows) == 16 and max(rows) < 2 * 128


def test_other_errors_are_not_swallowed(anime: LoadedModel) -> None:
    forward = CountingForward(anime, fail_on={2}, error=RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_EXECUTION_FAILED"):
        run_tiled(photos.coffee((64, 64)), anime, tile=32, forward=forward)
    assert forward.calls == 2


def test_cancelling_stops_between_tiles(anime: LoadedModel) -> None:
    cancel = threading.Event()
    forward = CountingForward(anime)
    reports: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        reports.append((done, total))
        cancel.set()

    with pytest.raises(Cancelled) as raised:
        run_tiled(photos.coffee((96, 96)), anime, tile=32, cancel=cancel, progress=progress, forward=forward)
    assert status_of(raised.value) == 499
    # The first batch was launched, the second too before the first landed (the pipeline); no more.
    assert forward.calls == 2 and reports == [(1, 9)]


def test_progress_counts_every_tile(anime: LoadedModel) -> None:
    reports: list[tuple[int, int]] = []
    plan = plan_tiles((96, 64), 4, 32, anime.spec, fixed_window=True)  # one window shape: batches of two
    run_tiled(photos.coffee((96, 64)), anime, plan=plan, batch=2, progress=lambda d, t: reports.append((d, t)))
    assert reports == [(2, 6), (4, 6), (6, 6)]


def test_batches_give_the_same_image_as_single_tiles(anime: LoadedModel) -> None:
    photo = photos.chelsea((100, 70))
    single = run_tiled(photo, anime, tile=32, batch=1)
    forward = CountingForward(anime)
    batched = run_tiled(photo, anime, tile=32, batch=5, forward=forward)
    # 4 × 3 tiles whose windows are narrower at the image's border: a batch holds one window shape.
    plan = plan_tiles((100, 70), 4, 32, anime.spec)
    shapes = [(1, 3, t.window.height, t.window.width) for t in plan.tiles]
    runs = [(shape[0], *shape[1:]) for shape in forward.shapes]
    assert sum(count for count, *_ in runs) == 12 and max(count for count, *_ in runs) >= 2
    assert [shape for count, *shape in runs for _ in range(count)] == [list(s[1:]) for s in shapes]
    fixed = CountingForward(anime)
    run_tiled(photo, anime, plan=plan_tiles((100, 70), 4, 32, anime.spec, fixed_window=True), batch=5, forward=fixed)
    assert [shape[0] for shape in fixed.shapes] == [5, 5, 2]
    assert np.abs(single.astype(int) - batched).max() <= 1


def test_16_bit_pixels_stay_16_bit(anime: LoadedModel) -> None:
    photo = photos.coffee((48, 32)).astype(np.uint16) * 257
    result = run_tiled(photo, anime, tile=24)
    assert result.dtype == np.uint16 and result.shape == (128, 192, 3)
    eight_bit = run_tiled(photos.coffee((48, 32)), anime, tile=24)
    assert psnr((result // 257).astype(np.uint8), eight_bit) >= 40
    assert len(np.unique(result)) > 2 * len(np.unique(eight_bit))  # precision kept beyond 8 bits


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (7, 1), (3, 2), (37, 23)])
def test_tiny_and_odd_sizes(tmp_path: Path, size: tuple[int, int]) -> None:
    model = tiny_model(tmp_path)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    result = run_tiled(pixels, model, tile=16)
    assert result.shape == (size[1] * 4, size[0] * 4, 3)
    assert psnr(result, run_tiled(pixels, model, tile=0)) >= 45


def test_rejects_pixels_that_are_not_rgb(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="H×W×3"):
        run_tiled(np.zeros((4, 4, 4), np.uint8), tiny_model(tmp_path), tile=16)
