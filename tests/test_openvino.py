"""OpenVINO, the CPU backend for fp32: converted once in the background, kept on disk, the same image as torch.

A CPU without native bf16 is simulated: this one has it, and then runs torch's bf16, with no OpenVINO at all.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from server import catalog
from server.engine import openvino_backend, precision
from server.engine.executor import run_tiled
from server.engine.models import load_model
from server.engine.runtime import LocalEngine
from server.engine.weights import find_weights
from server.imaging import Picture
from tests import photos
from tests.conftest import loupe_settings
from tests.engine_runs import run
from tests.test_executor import psnr
from tests.tiny_models import write_tiny_weights

pytestmark = pytest.mark.skipif(not openvino_backend.available(), reason="the openvino package is not installed")

WEIGHT = "realesr-animevideov3-x4"
ANIME = catalog.find("realesr-animevideov3")
assert ANIME is not None


@pytest.fixture
def one_weight(weights_dir: Path, tmp_path: Path) -> Path:
    """animevideov3's real ×4 file beside tiny ×2 and ×3 ones: start-up converts the real one, and quickly the others."""
    directory = write_tiny_weights(tmp_path / "weights", "realesr-animevideov3-x2", "realesr-animevideov3-x3")
    source = find_weights(WEIGHT, weights_dir)
    assert source is not None
    (directory / source.name).symlink_to(source)
    return directory


def started(weights: Path, data: Path) -> LocalEngine:
    engine = LocalEngine(loupe_settings(weights, data, compile=True))
    asyncio.run(engine.start())
    return engine


def wait_compiled(engine: LocalEngine, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = engine.workers[0].cache.peek(WEIGHT)
        if model is not None and model.compiled is not None:
            return model.compiled.backend
        time.sleep(0.2)
    raise AssertionError(f"{WEIGHT} was not compiled within {timeout} s")


@pytest.mark.slow
def test_a_cpu_without_bf16_runs_fp32_through_openvino_converted_once_and_kept(
        one_weight: Path, weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    picture = Picture(photos.chelsea((200, 150)))
    engine = started(one_weight, tmp_path / "data")
    try:
        assert wait_compiled(engine) == "openvino"
        plan = engine.plan(ANIME, picture, (800, 600))
        assert plan.describe()["passes"][0]["backend"] == "openvino" and plan.describe()["precision"] == "fp32"
        first = run(engine, ANIME, picture, (800, 600)).pixels
    finally:
        asyncio.run(engine.close())
    torch_fp32 = run_tiled(picture.pixels, load_model(WEIGHT, weights_dir, torch.device("cpu"), "fp32"), tile=0)
    assert psnr(torch_fp32, first) >= 60
    weights_file = find_weights(WEIGHT, one_weight)
    assert weights_file is not None
    kept = openvino_backend.ir_path(weights_file, tmp_path / "data" / "openvino")
    assert kept.exists() and kept.with_suffix(".bin").exists()

    # A restart finds the converted model on disk: nothing is converted again.
    import openvino

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    again = started(one_weight, tmp_path / "data")
    try:
        assert wait_compiled(again) == "openvino"
        assert np.array_equal(run(again, ANIME, picture, (800, 600)).pixels, first)
    finally:
        asyncio.run(again.close())


def test_a_cpu_with_native_bf16_runs_torch_and_converts_nothing(one_weight: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    engine = started(one_weight, tmp_path / "data")
    try:
        picture = Picture(photos.chelsea((64, 48)))
        plan = engine.plan(ANIME, picture, (256, 192)).describe()
        assert (plan["precision"], plan["passes"][0]["backend"]) == ("bf16", "torch")
        run(engine, ANIME, picture, (256, 192))
        model = engine.workers[0].cache.peek(WEIGHT)
        assert model is not None and model.compiled is None
    finally:
        asyncio.run(engine.close())
    assert not (tmp_path / "data" / "openvino").exists()
