"""Model loading, the model cache, tile sizing, device queues and the LocalEngine facade, on the CPU."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from server import catalog
from server.config import Settings
from server.engine import devices
from server.engine.devices import DeviceWorker
from server.engine.planning import PictureFacts
from server.engine.executor import run_tiled
from server.engine.models import (
    MAX_TILE_CUDA,
    CompiledForward,
    ModelCache,
    batch_bytes,
    choose_tiling,
    compile_model,
    load_model,
)
from server.engine.precision import cpu_has_native_bf16
from server.engine.profiles import profile_of
from server.engine.runtime import LocalEngine
from server.engine.tiling import plan_tiles, window_side
from server.engine.weights import MANIFEST
from server.api.errors import status_of
from server.errors import Cancelled, LoupeError, QueueFull, ShuttingDown
from server.imaging import Picture
from tests import photos
from tests.engine_runs import run, run_async
from tests.tiny_models import tiny_model, tiny_network, write_tiny_weights

CPU = torch.device("cpu")
ANIME = catalog.find("realesr-animevideov3")
X4PLUS = catalog.find("realesrgan-x4plus")
assert ANIME is not None and X4PLUS is not None


def engine_settings(weights_dir: Path, data_dir: Path, **overrides: object) -> Settings:
    return Settings.model_validate({"weights_dir": weights_dir, "data_dir": data_dir, "device": "cpu",
                                    "compile": False, **overrides})


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    return write_tiny_weights(tmp_path / "weights")


# Loading


def test_a_model_loads_in_the_precision_and_layout_the_policy_picks(tiny_weights: Path) -> None:
    model = load_model("realesr-animevideov3-x4", tiny_weights, CPU)
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    parameter = next(model.descriptor.model.parameters())
    assert model.dtype == expected and parameter.dtype == expected
    assert model.channels_last and parameter.is_contiguous(memory_format=torch.channels_last)
    assert not model.descriptor.model.training
    forced = load_model("realesr-animevideov3-x4", tiny_weights, CPU, "fp32")
    assert forced.dtype == torch.float32 and next(forced.descriptor.model.parameters()).dtype == torch.float32


def test_missing_weights_say_which_file_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(LoupeError) as raised:
        load_model("realesrgan-x4plus", tmp_path, CPU)
    assert status_of(raised.value) == 503 and raised.value.code == "WEIGHTS_MISSING"
    assert "loupe weights pull realesrgan-x4plus" in raised.value.message
    assert "loupe weights import-ncnn" in raised.value.message


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other architecture"])
def test_a_corrupt_weight_file_is_a_clear_503(tiny_weights: Path, damage: str) -> None:
    path = MANIFEST["realesr-animevideov3-x4"].converted_path(tiny_weights)
    assert path is not None
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        from safetensors.torch import save_file

        save_file(tiny_network("realesrgan-x4plus").state_dict(), str(path))
    with pytest.raises(LoupeError) as raised:
        load_model("realesr-animevideov3-x4", tiny_weights, CPU)
    assert status_of(raised.value) == 503 and raised.value.code == "WEIGHTS_CORRUPT"
    assert path.name in raised.value.message and "loupe weights pull realesr-animevideov3-x4" in raised.value.message
    assert str(tiny_weights) not in raised.value.message  # a client reads it: no server paths


# The model cache


def test_the_cache_unloads_the_least_recently_used_model_beyond_its_budget(tiny_weights: Path) -> None:
    sizes = {w: load_model(w, tiny_weights, CPU).nbytes
             for w in ("realesr-animevideov3-x2", "realesr-animevideov3-x3", "realesrgan-x4plus")}
    cache = ModelCache(CPU, tiny_weights, budget=sum(sizes.values()) - 1)  # room for any two, not for three
    first = cache.get("realesr-animevideov3-x2")
    cache.get("realesr-animevideov3-x3")
    assert cache.get("realesr-animevideov3-x2") is first  # a hit, and now the most recently used
    cache.get("realesrgan-x4plus")
    assert cache.peek("realesr-animevideov3-x3") is None
    assert cache.peek("realesr-animevideov3-x2") is first
    assert len(cache) == 2 and cache.nbytes <= cache.budget


def test_a_model_larger_than_the_budget_still_loads(tiny_weights: Path) -> None:
    cache = ModelCache(CPU, tiny_weights, budget=1)
    assert cache.get("realesrgan-x4plus").scale == 4 and len(cache) == 1


@pytest.mark.slow
def test_a_compiled_model_runs_its_batch_shape_and_gives_the_eager_image(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))  # restored afterwards
    model = dataclasses.replace(tiny_model(tmp_path / "weights"), tile=32, batch=2)
    compile_model(model, tmp_path / "compile-cache")
    assert model.compiled is not None and model.compiled.shape == (2, 3, 64, 64)
    assert any((tmp_path / "compile-cache").iterdir())  # inductor's cache, kept for the next start
    compiled, batches = model.compiled.fn, []

    def counted(batch: torch.Tensor) -> torch.Tensor:
        batches.append(batch.shape[0])
        return compiled(batch)

    model.compiled = CompiledForward(model.compiled.shape, counted, model.compiled.backend)
    photo = photos.coffee((96, 96))  # 3×3 tiles of 32 px: four full batches and one short one, padded
    plan = plan_tiles((96, 96), 4, 32, model.spec, fixed_window=True)  # the compiled shape, as on a GPU
    fast = run_tiled(photo, model, plan=plan, batch=2)
    assert batches == [2] * 5
    eager = run_tiled(photo, dataclasses.replace(model, compiled=None), plan=plan, batch=2)
    assert np.abs(fast.astype(int) - eager).max() <= 1
    batches.clear()
    run_tiled(photo, model, tile=0)  # another shape: eager, never a compile on a request
    assert batches == []


# Tile sizing


def test_less_free_memory_means_smaller_tiles() -> None:
    profile = profile_of("ESRGAN")
    tiles = [choose_tiling(profile, profile.tiling, torch.float16, torch.device("cuda"), free)
             for free in (1 << 40, 8 << 30, 2 << 30, 512 << 20, 64 << 20, 1 << 20)]
    assert tiles[0] == (MAX_TILE_CUDA, 1)  # one 576² window already saturates an H100
    assert [t for t, _ in tiles] == sorted((t for t, _ in tiles), reverse=True)
    assert tiles[-1] == (16, 1)
    # On the CPU no tile is fixed: each job's plan cuts the fewest tiles its memory allows.
    assert choose_tiling(profile, profile.tiling, torch.float32, CPU, 64 << 30) == (0, 1)


def test_a_free_gpu_runs_x4plus_in_under_4_gib_and_batches_the_light_networks() -> None:
    esrgan, compact = profile_of("ESRGAN"), profile_of("Compact")
    tile, batch = choose_tiling(esrgan, esrgan.tiling, torch.float16, torch.device("cuda"), 80 << 30)
    assert batch_bytes(esrgan, torch.float16, (window_side(tile, esrgan.tiling),) * 2, batch) < 3 << 30
    assert choose_tiling(compact, compact.tiling, torch.float16, torch.device("cuda"), 80 << 30) == (512, 4)


# Device queues


def test_a_device_past_its_budget_refuses_with_an_honest_retry_after(tiny_weights: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker's clock stands still: the running job's elapsed time is 0, so the retry-after is exact.
    monkeypatch.setattr(devices, "time", types.SimpleNamespace(monotonic=lambda: 1000.0))
    worker = DeviceWorker(CPU, ModelCache(CPU, tiny_weights, 1 << 30), budget_s=10)
    release, started = threading.Event(), threading.Event()
    ran: list[str] = []

    def blocking(_: DeviceWorker) -> str:
        started.set()
        release.wait(30)
        return "first"

    try:
        running = worker.submit(blocking, worker.reserve(6))
        assert started.wait(10)
        queued = worker.submit(lambda _: ran.append("queued"), worker.reserve(3))  # 9 s of 10: admitted
        assert worker.depth == 2
        with pytest.raises(QueueFull) as raised:
            worker.reserve(4)
        # 9 s reserved, less what already ran (nothing, by the frozen clock), plus 4, is 3 s past the budget.
        assert raised.value.retry_after_s == 3 and status_of(raised.value) == 429
        assert queued.cancel()  # cancelled while waiting: it never runs, and gives its seconds back
        release.set()
        assert running.result(10) == "first"
        deadline = time.monotonic() + 10
        while worker.backlog_s > 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert worker.submit(lambda _: "after", worker.reserve(4)).result(10) == "after"
        assert ran == []
    finally:
        release.set()
        worker.close(10)


def test_closing_a_device_fails_its_queued_jobs_as_shutting_down(tiny_weights: Path) -> None:
    worker = DeviceWorker(CPU, ModelCache(CPU, tiny_weights, 1 << 30), budget_s=10)
    release, started = threading.Event(), threading.Event()
    worker.submit(lambda _: (started.set(), release.wait(30)), worker.reserve(1))
    assert started.wait(10)
    queued = worker.submit(lambda _: "never", worker.reserve(1))
    closing = threading.Thread(target=worker.close, args=(10,))
    closing.start()
    with pytest.raises(ShuttingDown):
        queued.result(10)
    release.set()
    closing.join(10)
    assert worker.backlog_s == 0


def test_an_idle_device_takes_a_job_longer_than_its_budget(tiny_weights: Path) -> None:
    worker = DeviceWorker(CPU, ModelCache(CPU, tiny_weights, 1 << 30), budget_s=1)
    reservation = worker.reserve(50)
    with pytest.raises(QueueFull):
        worker.reserve(0.1)
    reservation.release()
    reservation.release()  # idempotent
    worker.reserve(0.1)
    worker.close(10)


# The engine


@pytest.fixture
def engine(tiny_weights: Path, tmp_path: Path) -> Iterator[LocalEngine]:
    engine = LocalEngine(engine_settings(tiny_weights, tmp_path / "data", tile_size=32))
    yield engine
    asyncio.run(engine.close())


def test_unavailable_models_say_why_and_what_to_run(tmp_path: Path, tiny_weights: Path) -> None:
    empty = LocalEngine(engine_settings(tmp_path / "none", tmp_path / "data"))
    reason = empty.unavailable_reason(X4PLUS)
    assert reason is not None and "loupe weights pull realesrgan-x4plus" in reason
    ready = LocalEngine(engine_settings(tiny_weights, tmp_path / "data"))
    assert ready.unavailable_reason(X4PLUS) is None and ready.unavailable_reason(ANIME) is None
    aura = catalog.find("aura-sr")
    topaz = catalog.find("topaz-image-upscale")
    assert aura is not None and topaz is not None
    assert ready.unavailable_reason(aura) is not None and ready.unavailable_reason(topaz) is not None
    assert ready.device_name == "CPU"


def test_upscale_reports_progress_and_counts_tiles(engine: LocalEngine) -> None:
    picture = Picture(photos.coffee((80, 48)).copy())
    reports: list[tuple[int, int]] = []
    result = asyncio.run(run_async(engine, ANIME, picture, (320, 192), progress=lambda d, t: reports.append((d, t))))
    assert result.pixels.shape == (192, 320, 3) and result.pixels.dtype == np.uint8
    assert reports[-1] == (6, 6) and [d for d, _ in reports] == sorted(d for d, _ in reports)
    stats = engine.stats()
    assert stats["tiles_processed"] == 6 and stats["queue_depth"] == 0 and stats["oom_retries"] == 0
    assert stats["gpu_memory_bytes"] is None and stats["models_loaded"] == 1


def test_a_picture_with_varying_alpha_reports_one_steady_total(engine: LocalEngine) -> None:
    rgb = photos.coffee((64, 32))
    alpha = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (32, 1))[..., None]
    reports: list[tuple[int, int]] = []
    result = run(engine, ANIME, Picture(np.concatenate([rgb, alpha], axis=2)), (256, 128),
                                 progress=lambda d, t: reports.append((d, t)))
    assert result.pixels.shape == (128, 256, 4)
    assert {total for _, total in reports} == {4}  # two runs (over black, over white) of two tiles
    assert reports[-1] == (4, 4)


def test_two_passes_chain_the_native_scales(engine: LocalEngine) -> None:
    picture = Picture(photos.chelsea((30, 20)).copy())
    plan = engine.plan(ANIME, picture, (180, 120))
    assert [(p.scale, p.weight_id, p.input_size) for p in plan.passes] == [
        (3, "realesr-animevideov3-x3", (30, 20)), (2, "realesr-animevideov3-x2", (90, 60))]
    assert plan.executed_model == "local/realesr-animevideov3-x3+realesr-animevideov3-x2"
    assert engine.upscale_sync(plan, picture)[0].pixels.shape == (120, 180, 3)


def test_the_dry_run_plan(engine: LocalEngine, tiny_weights: Path, tmp_path: Path) -> None:
    alpha = np.tile(np.linspace(0, 255, 100, dtype=np.uint8), (64, 1))[..., None]
    picture = Picture(np.concatenate([photos.coffee((100, 64)), alpha], axis=2))
    plan = engine.plan(X4PLUS, picture, (400, 256)).describe()
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert plan["device"] == "cpu" and plan["precision"] == expected and plan["layout"] == "channels_last"
    assert plan["model_runs"] == 2  # a varying alpha: over black and over white
    (step,) = plan["passes"]
    assert step["tile"] == 32 and step["tiles"] == 4 * 2 and step["output"] == [400, 256]
    assert plan["tiles"] == 2 * 4 * 2
    assert plan["estimated_seconds"] > 0 and plan["estimated_peak_host_bytes"] > 400 * 256 * 3
    assert plan["estimated_peak_device_bytes"] > 0
    full_frame = LocalEngine(engine_settings(tiny_weights, tmp_path / "data", tile_size=0))
    assert full_frame.plan(X4PLUS, picture, (400, 256)).describe()["passes"][0]["tiles"] == 1
    planned = LocalEngine(engine_settings(tiny_weights, tmp_path / "data"))
    assert planned.plan(X4PLUS, picture, (400, 256)).describe()["tiles"] == 2  # it fits: one full frame per run


def test_cancelling_a_running_job_stops_it_between_tiles(engine: LocalEngine) -> None:
    cancel = threading.Event()
    reports: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        reports.append((done, total))
        if done:  # the first tile is done (the first report, (0, 16), says the device took the job)
            cancel.set()

    with pytest.raises(Cancelled):
        run(engine, ANIME, Picture(photos.coffee((128, 128)).copy()), (512, 512), progress=progress,
                            cancel=cancel)
    assert reports == [(0, 16), (1, 16)]
    assert engine.stats()["tiles_processed"] == 1


def test_an_engine_past_its_budget_refuses_before_decoding(tiny_weights: Path, tmp_path: Path) -> None:
    engine = LocalEngine(engine_settings(tiny_weights, tmp_path / "data", max_queue_s=1))
    big = PictureFacts.from_header(2048, 2048, alpha=True)
    held = engine.reserve(X4PLUS, big, (8192, 8192))  # an idle device takes it, whatever its size
    try:
        assert held.seconds > 1 and engine.stats()["queue_seconds"] > 1
        with pytest.raises(QueueFull) as raised:
            engine.reserve(ANIME, PictureFacts.from_header(16, 16, alpha=False), (64, 64))
        assert raised.value.retry_after_s >= held.seconds - 1 - 1
    finally:
        held.release()
        asyncio.run(engine.close())
    assert engine.stats()["queue_seconds"] == 0


def test_concurrent_requests_never_mix(engine: LocalEngine) -> None:
    pictures = [Picture(photos.coffee((40, 40)).copy()), Picture(photos.chelsea((40, 40)).copy()),
                Picture(photos.astronaut((40, 40)).copy())]
    alone = [run(engine, ANIME, p, (160, 160)).pixels for p in pictures]

    async def together() -> list[Picture]:
        return await asyncio.gather(*(run_async(engine, ANIME, p, (160, 160)) for p in pictures))

    for result, expected in zip(asyncio.run(together()), alone):
        assert np.array_equal(result.pixels, expected)


def test_cancelling_the_awaiting_task_cancels_a_queued_job(engine: LocalEngine) -> None:
    release, started = threading.Event(), threading.Event()
    ran: list[str] = []

    def blocking(_: DeviceWorker) -> None:
        started.set()
        release.wait(30)

    async def scenario() -> None:
        engine.workers[0].submit(blocking)
        assert await asyncio.to_thread(started.wait, 10)
        task = asyncio.create_task(run_async(engine, ANIME, Picture(photos.coffee((16, 16)).copy()), (64, 64),
                                                  progress=lambda d, t: ran.append("ran")))
        deadline = time.monotonic() + 60  # the task decodes, plans and submits: it joins the queue
        while engine.stats()["queue_depth"] < 2:
            assert not task.done(), task
            assert time.monotonic() < deadline, "the job never joined the device's queue"
            await asyncio.sleep(0.01)
        assert engine.stats()["queue_depth"] == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await engine.close()

    asyncio.run(scenario())
    assert ran == []


def test_a_corrupt_weight_fails_the_request_with_a_503(tiny_weights: Path, tmp_path: Path) -> None:
    path = MANIFEST["realesr-animevideov3-x4"].converted_path(tiny_weights)
    assert path is not None
    path.write_bytes(b"broken")
    engine = LocalEngine(engine_settings(tiny_weights, tmp_path / "data"))
    with pytest.raises(LoupeError) as raised:
        asyncio.run(run_async(engine, ANIME, Picture(photos.coffee((16, 16)).copy()), (64, 64)))
    assert status_of(raised.value) == 503 and raised.value.code == "WEIGHTS_CORRUPT"
