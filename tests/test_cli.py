"""`loupe upscale` and `loupe weights`, run as a user runs them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata


def loupe(*args: str, weights_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOUPE_WEIGHTS_DIR": str(weights_dir), "LOUPE_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _photo(size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(skdata.astronaut()).resize(size, Image.Resampling.LANCZOS))


@pytest.mark.parametrize(
    ("name", "make", "mode"),
    [
        ("rgba", lambda: Image.fromarray(np.dstack([_photo((40, 30)), np.linspace(0, 255, 40 * 30).reshape(30, 40)
                                                    .astype(np.uint8)])), "RGBA"),
        ("gray", lambda: Image.fromarray(_photo((40, 30))).convert("L"), "L"),
        ("gray16", lambda: Image.fromarray((_photo((40, 30))[..., 0].astype(np.uint16) * 257)), "I;16"),
    ],
)
def test_upscale_keeps_the_mode(name: str, make, mode: str, tmp_path: Path, weights_dir: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / f"{name}.png"
    make().save(source)
    target = tmp_path / f"{name}-big.png"
    result = loupe("upscale", str(source), "-o", str(target), "--model", "realesr-animevideov3", "--scale", "2.5",
                   "-q", weights_dir=weights_dir)
    assert result.returncode == 0, result.stderr
    with Image.open(target) as output:
        assert output.size == (100, 75)
        assert output.mode == mode or (mode == "I;16" and output.mode.startswith("I;16"))


def test_sixteen_bit_rgb_stays_sixteen_bit(tmp_path: Path, weights_dir: Path) -> None:
    import cv2

    pixels = (_photo((32, 24)).astype(np.uint16) * 257)
    pixels[0, 0] = (1, 2, 3)  # values that exist only at 16 bits
    source = tmp_path / "rgb16.png"
    cv2.imwrite(str(source), pixels[..., ::-1])
    target = tmp_path / "rgb16-big.png"
    result = loupe("upscale", str(source), "-o", str(target), "--model", "realesr-animevideov3", "--scale", "2", "-q",
                   weights_dir=weights_dir)
    assert result.returncode == 0, result.stderr
    output = cv2.imread(str(target), cv2.IMREAD_UNCHANGED)
    assert output.dtype == np.uint16 and output.shape == (48, 64, 3)
    assert np.any(output % 257 != 0)  # not 8-bit data stretched to 16


def test_fractional_scale_gives_the_exact_size(tmp_path: Path, weights_dir: Path) -> None:
    source = tmp_path / "in.jpg"
    Image.fromarray(_photo((37, 23))).save(source)
    target = tmp_path / "out.webp"
    result = loupe("upscale", str(source), "-o", str(target), "--model", "realesr-animevideov3", "--scale", "1.37",
                   "-q", weights_dir=weights_dir)
    assert result.returncode == 0, result.stderr
    assert Image.open(target).size == (round(37 * 1.37), round(23 * 1.37))


def test_unknown_model_is_a_clear_error(tmp_path: Path, weights_dir: Path) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(_photo((8, 8))).save(source)
    result = loupe("upscale", str(source), "-o", str(tmp_path / "o.png"), "--model", "nope", weights_dir=weights_dir)
    assert result.returncode == 2
    assert "not a local model" in result.stderr


def test_weights_list_shows_presence_size_and_source(weights_dir: Path) -> None:
    result = loupe("weights", "list", weights_dir=weights_dir)
    assert result.returncode == 0, result.stderr
    assert "realesrgan-x4plus" in result.stdout and "aura-sr" in result.stdout
