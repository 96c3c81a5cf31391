"""AuraSR runs locally: a reduced-config AuraSR through spandrel, the 64-px grid with its shifted pass, seeded noise.

The network is fal's architecture at tiny dims and depths (tests/tiny_aura.py) with random weights: what it shows
is how Loupe runs AuraSR (detection, tiling, blending, noise), not how well AuraSR upscales.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from server import catalog
from server.config import Settings
from server.engine.aura import SeededNoise
from server.engine.executor import Counters, run_tiled
from server.engine.models import LoadedModel, load_model
from server.engine.runtime import LocalEngine
from server.engine.tiling import Box, Plan, TilingSpec, plan_tiles
from server.api.errors import status_of
from server.errors import LoupeError
from server.imaging import Picture
from tests import photos
from tests.conftest import loupe_settings
from tests.engine_runs import run
from tests.servers import serve
from tests.tiny_aura import write_tiny_aura

CPU = torch.device("cpu")
AURA = catalog.find("aura-sr")
assert AURA is not None
GRID = TilingSpec(context=0, blend=0, multiple_of=8, minimum=16, grid=64, shifted_pass=True)
ONE_PASS = dataclasses.replace(GRID, shifted_pass=False)
FULL_FRAME = TilingSpec(context=0, blend=0, multiple_of=8, minimum=16)


@pytest.fixture(scope="module")
def aura_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights_dir = tmp_path_factory.mktemp("aura-weights")
    write_tiny_aura(weights_dir)
    return weights_dir


@pytest.fixture(scope="module")
def aura(aura_weights: Path) -> LoadedModel:
    return load_model("aura-sr", aura_weights, CPU)


def engine_settings(weights_dir: Path, data_dir: Path, **overrides: object) -> Settings:
    return Settings.model_validate({"weights_dir": weights_dir, "data_dir": data_dir, "device": "cpu",
                                    "compile": False, **overrides})


@pytest.fixture
def engine(aura_weights: Path, tmp_path: Path) -> Iterator[LocalEngine]:
    engine = LocalEngine(engine_settings(aura_weights, tmp_path / "data"))
    yield engine
    asyncio.run(engine.close())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# Loading


def test_spandrel_detects_the_reduced_aurasr_and_the_engine_loads_it_for_its_grid(aura: LoadedModel) -> None:
    descriptor = aura.descriptor
    assert (descriptor.architecture.id, descriptor.scale, aura.scale) == ("AuraSR", 4, 4)
    hyper = descriptor.model.hyperparameters
    assert (hyper["dim"], hyper["up_dim_mults"], hyper["down_dim_mults"]) == (4, (1, 1, 2, 2, 4), (2, 2, 4))
    assert (hyper["attn_depths"], hyper["mid_attn_depth"], hyper["num_conv_kernels"]) == ((2, 2, 2, 1, 1), 1, 2)
    assert hyper["style_network"] == {"dim_in": 8, "dim_out": 32, "depth": 1}
    assert aura.params < 200_000 and aura.dtype == torch.float32 and not descriptor.supports_half
    assert aura.spec == GRID and aura.tile == 64 and 1 <= aura.batch <= 4 and not aura.channels_last


def test_without_weights_aura_is_not_runnable_and_says_what_to_run(aura_weights: Path, tmp_path: Path) -> None:
    empty = LocalEngine(engine_settings(tmp_path / "none", tmp_path / "data"))
    reason = empty.unavailable_reason(AURA)
    assert reason is not None and "loupe weights pull aura-sr" in reason
    assert "place any AuraSR .safetensors file in LOUPE_WEIGHTS_DIR/aura-sr" in reason
    assert str(tmp_path) not in reason  # clients read it: the folder under the setting, never the server's path
    assert "import-ncnn" not in reason
    with pytest.raises(LoupeError) as raised:
        run(empty, AURA, Picture(photos.coffee((32, 32)).copy()), (128, 128))
    assert status_of(raised.value) == 503 and raised.value.code == "MODEL_UNAVAILABLE"
    ready = LocalEngine(engine_settings(aura_weights, tmp_path / "data"))
    assert ready.unavailable_reason(AURA) is None


# The grid


def grid_plans() -> list[tuple[tuple[int, int], TilingSpec]]:
    sizes = [(1, 1), (16, 9), (64, 64), (100, 37), (160, 96)]
    return [(size, spec) for size in sizes for spec in (GRID, ONE_PASS)]


def coverage(plan: Plan) -> np.ndarray:
    width, height = plan.output_size
    total = np.zeros((height, width))
    for tile in plan.tiles:
        box = tile.paste
        total[box.y0 : box.y1, box.x0 : box.x1] += np.outer(tile.weight_y, tile.weight_x)
    return total


@pytest.mark.parametrize(("size", "spec"), grid_plans())
def test_grid_windows_are_native_tiles_and_cover_every_pixel(size: tuple[int, int], spec: TilingSpec) -> None:
    plan = plan_tiles(size, 4, 512, spec)  # a grid ignores the tile size it is given
    offsets = {0, 32} if spec.shifted_pass else {0}
    assert plan.window == (64, 64) and plan.tile == 64
    for tile in plan.tiles:
        window = tile.window
        assert (window.width, window.height) == (64, 64)
        assert window.x0 % 64 == window.y0 % 64 and window.x0 % 64 in offsets
        assert tile.paste.width == len(tile.weight_x) and tile.paste.height == len(tile.weight_y)
        assert min(tile.weight_x.min(), tile.weight_y.min()) > 0
    total = coverage(plan)
    if spec.shifted_pass:
        assert total.min() > 0
    else:
        assert np.array_equal(total, np.ones_like(total))  # tiles meet edge to edge, each pixel from one tile
    for i, final in enumerate(plan.flush_after):
        assert all(t.paste.y0 >= final for t in plan.tiles[i + 1 :])


def test_the_shifted_grid_sits_half_a_tile_off_and_the_ramps_of_both_add_up_to_one() -> None:
    plan = plan_tiles((160, 96), 4, 0, GRID)
    assert len(plan.tiles) == 3 * 2 + 3 * 2
    columns = np.zeros(160 * 4)
    for tile in plan.tiles:
        if tile.window.y0 in (0, -32):  # one row of each grid
            columns[tile.paste.x0 : tile.paste.x1] += tile.weight_x
    assert np.allclose(columns, 1, atol=1e-6)
    inner = next(tile for tile in plan.tiles if (tile.window.x0, tile.window.y0) == (0, 0))
    # Centre-weighted: a window counts most at its centre, least at its edges.
    assert inner.weight_x.argmax() in (127, 128) and inner.weight_x[0] < 1e-3 and inner.weight_x[-1] < 1e-3


@pytest.mark.parametrize("size", [(1, 1), (17, 5), (65, 64)])
def test_tiny_and_odd_sizes_run(aura: LoadedModel, size: tuple[int, int]) -> None:
    width, height = size
    result = run_tiled(photos.chelsea(size), aura, tile=64, batch=aura.batch, seed=1)
    assert result.shape == (4 * height, 4 * width, 3) and result.dtype == np.uint8


# Seeded noise


def test_the_same_seed_gives_the_same_bytes_and_another_seed_another_image(aura: LoadedModel) -> None:
    photo = photos.coffee((72, 40))
    first = run_tiled(photo, aura, tile=64, batch=aura.batch, seed=7)
    torch.manual_seed(1234)  # torch's global generators play no part
    again = run_tiled(photo, aura, tile=64, batch=aura.batch, seed=7)
    other = run_tiled(photo, aura, tile=64, batch=aura.batch, seed=8)
    assert first.shape == (160, 288, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_the_input_jitter_belongs_to_image_positions_not_to_windows(aura: LoadedModel) -> None:
    noise = SeededNoise(7, aura.descriptor.model)
    window = noise.jitter(Box(0, 0, 64, 64))
    shifted = noise.jitter(Box(-32, 32, 32, 96))  # half outside the image, as a shifted-grid window reads
    assert window.shape == (3, 64, 64) and abs(float(window.std()) - 1) < 0.05
    assert torch.equal(window[:, 32:, :32], shifted[:, :32, 32:])
    assert not torch.equal(window, SeededNoise(8, aura.descriptor.model).jitter(Box(0, 0, 64, 64)))
    assert not torch.equal(window, noise.jitter(Box(64, 0, 128, 64)))


def test_batching_and_concurrent_jobs_do_not_change_the_image(aura: LoadedModel) -> None:
    photo = photos.chelsea((72, 40))
    alone = {seed: run_tiled(photo, aura, tile=64, batch=4, seed=seed) for seed in (7, 8)}
    # In 16 bits the input jitter shows: noise that followed the batch, not the image, would move pixels by ~50.
    deep = photo.astype(np.uint16) * 257
    batched, one_by_one = (run_tiled(deep, aura, tile=64, batch=batch, seed=7) for batch in (4, 1))
    # Different batch sizes run different grouped convolutions: float rounding, never other noise.
    assert np.abs(one_by_one.astype(int) - batched).max() <= 2
    together: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda s=seed: together.update({s: run_tiled(photo, aura, tile=64, batch=4,
                                                                                      seed=s)}))
               for seed in (8, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(together[seed], alone[seed]) for seed in (7, 8))


# No grid shows


def grid_line_error(image: np.ndarray, reference: np.ndarray, lines: list[int], width: int = 4) -> tuple[float, float]:
    """Mean absolute error on the output rows and columns within `width` px of `lines`, and elsewhere."""
    error = np.abs(image.astype(np.float64) - reference).mean(axis=2)
    near = np.zeros(error.shape, dtype=bool)
    for line in lines:
        near[max(line - width, 0) : line + width, :] = True
        near[:, max(line - width, 0) : line + width] = True
    return float(error[near].mean()), float(error[~near].mean())


def test_the_shifted_pass_hides_the_tile_grid(aura: LoadedModel) -> None:
    photo = photos.astronaut((160, 96))
    # The grid reads reflected pixels past the image's border; so does this full frame, padded by 32 px.
    padded = np.pad(photo, ((32, 32), (32, 32), (0, 0)), mode="reflect")
    full = run_tiled(padded, aura, tile=0, spec=FULL_FRAME, seed=7)[128:-128, 128:-128]
    two = run_tiled(photo, aura, tile=64, batch=aura.batch, seed=7)
    one = run_tiled(photo, aura, tile=64, batch=aura.batch, spec=ONE_PASS, seed=7)
    assert full.shape == two.shape == one.shape == (384, 640, 3)
    borders = [256, 512]  # the one-pass grid's inner tile borders, in output pixels
    one_at_grid, one_elsewhere = grid_line_error(one, full, borders)
    two_at_grid, two_elsewhere = grid_line_error(two, full, borders)
    # One pass: tile borders stand out against a full-frame pass; a test that can see a grid.
    assert one_at_grid > 10 * one_elsewhere and one_at_grid > 5
    # Two passes: each border is covered by the other grid's tile centres.
    assert two_at_grid < one_at_grid / 10 and two_at_grid < 1.5
    assert psnr(two, full) >= 45 > psnr(one, full) + 10


# Out of memory


class FailingForward:
    """Calls the model, recording batch shapes; raises out-of-memory on the calls listed, or on every call."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], fail_on: set[int] | None = None) -> None:
        self.model = model
        self.fail_on = fail_on
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(batch.shape))
        if self.fail_on is None or len(self.shapes) in self.fail_on:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(batch)


def test_out_of_memory_halves_the_batch_and_keeps_the_native_tile(aura: LoadedModel) -> None:
    photo = photos.coffee((160, 96))
    clean = run_tiled(photo, aura, tile=64, batch=4, seed=3)
    forward = FailingForward(aura, fail_on={2})
    counters = Counters()
    recovered = run_tiled(photo, aura, tile=64, batch=4, seed=3, forward=forward, counters=counters)
    assert [shape[0] for shape in forward.shapes] == [4, 4, 2, 2, 2, 2]
    assert {shape[2:] for shape in forward.shapes} == {(64, 64)}
    assert counters.oom_retries == 1 and counters.tiles == 12
    assert np.abs(recovered.astype(int) - clean).max() <= 1
    with pytest.raises(LoupeError) as raised:
        run_tiled(photo, aura, tile=64, batch=2, seed=3, forward=FailingForward(aura))
    assert status_of(raised.value) == 503 and raised.value.code == "DEVICE_OUT_OF_MEMORY"
    assert "even one 64-pixel tile at a time" in raised.value.message


# Through the engine: any scale, alpha, grayscale, 16 bits; the overlap setting


def test_alpha_grayscale_and_16_bits_go_through_the_shared_pipeline(engine: LocalEngine) -> None:
    rgb = photos.coffee((40, 24))
    alpha = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (24, 1))[..., None]
    rgba = Picture(np.concatenate([rgb, alpha], axis=2))
    first = run(engine, AURA, rgba, (100, 60), seed=5)
    assert first.pixels.shape == (60, 100, 4) and first.pixels.dtype == np.uint8
    assert np.array_equal(first.pixels, run(engine, AURA, rgba, (100, 60), seed=5).pixels)
    gray16 = Picture(rgb[..., :1].astype(np.uint16) * 257 + np.arange(40, dtype=np.uint16)[None, :, None])
    deep = run(engine, AURA, gray16, (160, 96), seed=5)
    assert deep.pixels.shape == (96, 160, 1) and deep.pixels.dtype == np.uint16
    assert np.any(deep.pixels % 257 != 0)  # 16-bit values, not 8-bit ones widened


def test_the_overlap_setting_halves_the_tiles_of_the_plan(engine: LocalEngine, aura_weights: Path,
                                                          tmp_path: Path) -> None:
    picture = Picture(photos.coffee((160, 96)).copy())
    with_overlap = engine.plan(AURA, picture, (640, 384)).describe()
    single = LocalEngine(engine_settings(aura_weights, tmp_path / "single", aura_overlap=False))
    without = single.plan(AURA, picture, (640, 384)).describe()
    assert with_overlap["precision"] == without["precision"] == "fp32"  # AuraSR's profile: fp32 only
    (step,), (single_step,) = with_overlap["passes"], without["passes"]
    assert (step["tile"], step["tiles"], single_step["tiles"]) == (64, 12, 6)
    assert without["estimated_seconds"] < with_overlap["estimated_seconds"]
    reports: list[tuple[int, int]] = []
    run(single, AURA, picture, (640, 384), seed=1, progress=lambda done, total: reports.append((done, total)))
    assert reports[-1] == (6, 6)
    asyncio.run(single.close())


# Over HTTP


@pytest.fixture(scope="module")
def client(aura_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    from server.app import create_app

    settings = loupe_settings(aura_weights, tmp_path_factory.mktemp("aura-data"))
    with serve(create_app(settings)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0, timeout=120)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def edit(client: openai.OpenAI, image: bytes, **extra: object) -> list[np.ndarray]:
    result = client.images.edit(model="aura-sr", image=("photo.png", image, "image/png"), prompt="upscale",
                                response_format="b64_json", n=int(extra.pop("n", 1)), extra_body=extra)
    assert result.model_extra is not None
    metadata = result.model_extra["metadata"]
    assert (metadata["executed_model"], metadata["provider"], metadata["cost"]) == ("local/aura-sr", "local", 0)
    assert result.data is not None
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json or "")))) for item in result.data]


def test_the_api_runs_aura_locally_and_a_seed_repeats_its_image(client: openai.OpenAI) -> None:
    cards = {model.id: model for model in client.models.list()}
    assert cards["aura-sr"].model_extra is not None and cards["aura-sr"].model_extra["where"] == "local"
    image = png(photos.chelsea((40, 24)))
    (seven,) = edit(client, image, seed=7)
    (again,) = edit(client, image, seed=7)
    (eight,) = edit(client, image, seed=8)
    assert seven.shape == (96, 160, 3)
    assert np.array_equal(seven, again) and not np.array_equal(seven, eight)
    assert all(np.array_equal(a, b) for a, b in zip(edit(client, image, seed=7, n=2), (seven, eight)))
    unseeded = edit(client, image, n=2)
    assert not np.array_equal(*unseeded)
    (scaled,) = edit(client, image, seed=7, scale_factor=2.5)
    assert scaled.shape == (60, 100, 3)
