"""The precision and layout policy: what each device runs, the LOUPE_PRECISION override, and its start-up errors."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from server import catalog
from server.config import PROJECT_ROOT, SettingsError
from server.engine import precision
from server.engine.executor import run_tiled
from server.engine.models import load_model
from server.engine.precision import Capabilities, Execution, choose
from server.engine.runtime import LocalEngine
from server.imaging import Picture
from tests import photos
from tests.conftest import loupe_settings
from tests.servers import serve
from tests.test_executor import psnr

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
CONV_NET = Capabilities()  # ESRGAN and Compact: fp16 and bf16, channels_last
AURA = Capabilities(half=False, bfloat16=False, fp32_only=True, channels_last=False)


def test_a_cpu_with_native_bf16_runs_bf16_channels_last_and_one_without_runs_fp32() -> None:
    assert choose("auto", CPU, CONV_NET, native_bf16=True) == Execution(torch.bfloat16, True)
    assert choose("auto", CPU, CONV_NET, native_bf16=False) == Execution(torch.float32, True)
    assert choose("auto", CPU, Capabilities(bfloat16=False), native_bf16=True) == Execution(torch.float32, True)


def test_cuda_runs_fp16_where_the_architecture_takes_it() -> None:
    assert choose("auto", CUDA, CONV_NET) == Execution(torch.float16, True)


def test_an_fp32_only_architecture_stays_fp32_whatever_is_asked() -> None:
    for setting in ("auto", "bf16", "fp16", "fp32"):
        for device in (CPU, CUDA):
            assert choose(setting, device, AURA, native_bf16=True) == Execution(torch.float32, False)


def test_the_override_wins_over_the_detection() -> None:
    assert choose("fp32", CPU, CONV_NET, native_bf16=True).dtype == torch.float32
    assert choose("fp32", CUDA, CONV_NET).dtype == torch.float32
    assert choose("bf16", CPU, CONV_NET, native_bf16=False).dtype == torch.bfloat16  # asked for: slow, but honoured
    assert choose("bf16", CUDA, CONV_NET).dtype == torch.bfloat16
    assert choose("fp16", CUDA, Capabilities(half=False)).dtype == torch.float32  # the network can't take it


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the kernel's CPU flags")
def test_native_bf16_is_detected_from_the_hardware() -> None:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert precision.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_fp16_on_the_cpu_is_a_start_up_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="LOUPE_PRECISION=fp16 needs a GPU"):
        LocalEngine(loupe_settings(tmp_path, tmp_path, precision="fp16"))


@pytest.mark.parametrize(("value", "message"), [
    ("fp16", "LOUPE_PRECISION=fp16 needs a GPU"),
    ("fp17", "LOUPE_PRECISION: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
])
def test_loupe_serve_refuses_a_precision_it_cannot_run_before_it_starts(tmp_path: Path, value: str,
                                                                        message: str) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}, "LOUPE_PRECISION": value,
           "LOUPE_DEVICE": "cpu", "LOUPE_WEIGHTS_DIR": str(tmp_path), "LOUPE_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", "1"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


# With the real weights


@pytest.mark.parametrize(("model", "weight", "size", "tile"), [
    ("realesrgan-x4plus", "realesrgan-x4plus", (96, 72), 48),
    ("realesrgan-x4plus-anime", "realesrgan-x4plus-anime", (128, 96), 64),
    ("realesr-animevideov3", "realesr-animevideov3-x4", (240, 160), 96),
])
def test_the_policys_tiles_stay_within_45_db_of_an_fp32_full_frame(weights_dir: Path, tmp_path: Path, model: str,
                                                                   weight: str, size: tuple[int, int],
                                                                   tile: int) -> None:
    entry = catalog.find(model)
    assert entry is not None
    picture = Picture(photos.astronaut(size))
    engine = LocalEngine(loupe_settings(weights_dir, tmp_path, tile_size=tile))
    plan = engine.plan(entry, picture, (size[0] * 4, size[1] * 4))
    (step,) = plan.passes
    assert len(step.tiles.tiles) >= 4
    assert step.execution.dtype == (torch.bfloat16 if precision.cpu_has_native_bf16() else torch.float32)
    result = engine.upscale_sync(plan, picture)[0].pixels
    truth = run_tiled(picture.pixels, load_model(weight, weights_dir, CPU, "fp32"), tile=0)
    assert psnr(truth, result) >= 45  # over the whole image, its border included


def test_forcing_fp32_gives_the_fp32_full_frame(weights_dir: Path, tmp_path: Path) -> None:
    entry = catalog.find("realesr-animevideov3")
    assert entry is not None
    picture = Picture(photos.chelsea((160, 120)))
    engine = LocalEngine(loupe_settings(weights_dir, tmp_path, precision="fp32"))
    plan = engine.plan(entry, picture, (640, 480))
    assert plan.describe()["precision"] == "fp32"
    result = engine.upscale_sync(plan, picture)[0].pixels
    network = load_model("realesr-animevideov3-x4", weights_dir, CPU, "fp32").descriptor.model
    with torch.inference_mode():
        batch = torch.from_numpy(picture.pixels.copy()).permute(2, 0, 1)[None].float() / 255
        bare = (network(batch)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.abs(result.astype(int) - bare).max() <= 1  # channels_last sums in another order: a rounding apart


def test_a_cpu_without_bf16_falls_back_to_fp32_end_to_end(weights_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from server.app import create_app

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with serve(create_app(loupe_settings(weights_dir, tmp_path))) as url:
        card = httpx.get(f"{url}/v1/models/realesrgan-x4plus").json()
        assert (card["local"]["precision"], card["local"]["layout"]) == ("fp32", "channels_last")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        image = ("photo.png", _png(photos.coffee((48, 32))), "image/png")
        result = client.images.edit(model="realesr-animevideov3", image=image, prompt="",  # type: ignore[arg-type]
                                    extra_body={"scale_factor": 2})
        assert result.size == "96x64"
        dry = httpx.post(f"{url}/v1/images/edits?dryRun=true", data={"model": "realesrgan-x4plus"},
                         files={"image": image}, timeout=60).json()
        assert dry["plan"]["precision"] == "fp32"


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
