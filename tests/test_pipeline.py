"""One picture to an exact size: native passes, exact resampling, alpha, grayscale and 16 bits.

A nearest-neighbour upscaler stands in for the model: these tests are about sizes, channel
layouts and the alpha maths, which must hold whatever the model draws.
"""
from __future__ import annotations

import numpy as np
import pytest

from server.engine.pipeline import RunRgb, constant_alpha, model_runs, plan_passes, upscale_picture
from server.imaging import Picture, resize
from tests.photos import astronaut


class NearestNeighbour:
    """A stand-in model: each pixel becomes an s×s block. Records the calls it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def __call__(self, pixels: np.ndarray, scale: int) -> np.ndarray:
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.flags.c_contiguous
        self.calls.append((pixels.shape, scale))
        return np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)


def upscale(picture: Picture, target: tuple[int, int], natives: tuple[int, ...], run_rgb: RunRgb) -> Picture:
    """The pipeline with the passes a job plan would choose from `natives`."""
    passes = plan_passes(max(target[0] / picture.width, target[1] / picture.height), natives)
    return upscale_picture(picture, target, passes, run_rgb)


def nearest(pixels: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)


def alpha_ramp(height: int, width: int, dtype: type = np.uint8) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.broadcast_to(np.linspace(0, top, width).round().astype(dtype), (height, width)).copy()


@pytest.mark.parametrize(
    ("scale", "natives", "passes"),
    [
        (2, (2, 3, 4), [2]),
        (3, (2, 3, 4), [3]),
        (2.5, (2, 3, 4), [3]),
        (4, (2, 3, 4), [4]),
        (6, (2, 3, 4), [3, 2]),
        (8, (2, 3, 4), [4, 2]),
        (12, (2, 3, 4), [4, 3]),
        (16, (2, 3, 4), [4, 4]),
        (4.0000000001, (2, 3, 4), [4]),  # float noise from target rounding is not a reason for a second pass
        (1.5, (4,), [4]),
        (4, (4,), [4]),
        (5, (4,), [4, 4]),
        (8, (4,), [4, 4]),
        (5, (2, 4), [4, 2]),
        (1, (2, 4), [2]),
        (0.5, (4,), [4]),
        (0.5, (2, 3, 4), [2]),
        (2.5, (1,), [1]),  # a 1x network runs once; the resample makes the scale
    ],
)
def test_plan_passes(scale: float, natives: tuple[int, ...], passes: list[int]) -> None:
    assert plan_passes(scale, natives) == passes


@pytest.mark.parametrize("scale, natives", [(2, ()), (0, (4,)), (float("nan"), (4,))])
def test_plan_passes_rejects_impossible_plans(scale: float, natives: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        plan_passes(scale, natives)


@pytest.mark.parametrize("scale", [1.37, 2.5, 0.5, 3.0, 7.9])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_output_has_exactly_the_target_size(scale: float, channels: int) -> None:
    photo = astronaut((61, 47))
    pixels = np.dstack([photo, alpha_ramp(47, 61)])[..., [0, 3] if channels == 2 else slice(0, channels)]
    picture = Picture(np.ascontiguousarray(pixels))
    target = (round(61 * scale), round(47 * scale))
    out = upscale(picture, target, (2, 4), nearest)
    assert (out.width, out.height) == target
    assert out.channels == channels and out.pixels.dtype == np.uint8


def test_a_target_with_another_aspect_ratio_is_met_exactly() -> None:
    out = upscale(Picture(astronaut((40, 40))), (150, 90), (4,), nearest)
    assert (out.width, out.height) == (150, 90)


def test_passes_that_land_exactly_are_not_resampled() -> None:
    photo = astronaut((30, 20))
    model = NearestNeighbour()
    out = upscale(Picture(photo), (240, 160), (2, 4), model)
    assert model.calls == [((20, 30, 3), 4), ((80, 120, 3), 2)]
    np.testing.assert_array_equal(out.pixels, nearest(photo, 8))


def test_fractional_scale_resamples_the_native_output() -> None:
    photo = astronaut((30, 20))
    out = upscale(Picture(photo), (75, 50), (4,), nearest)  # 2.5× from one ×4 pass
    np.testing.assert_array_equal(out.pixels, resize(nearest(photo, 4), 75, 50))
    assert abs(out.pixels.mean() - photo.mean()) < 2


def test_constant_alpha_is_reattached_exactly_and_runs_once_per_pass() -> None:
    photo = astronaut((30, 20))
    picture = Picture(np.dstack([photo, np.full((20, 30), 200, np.uint8)]))
    model = NearestNeighbour()
    out = upscale(picture, (91, 61), (2, 4), model)
    assert constant_alpha(picture) == 200
    assert (out.pixels[..., 3] == 200).all()
    assert len(model.calls) == model_runs(4, True, plan_passes(91 / 30, (2, 4))) == 1


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_black_and_white_trick_recovers_an_alpha_ramp(dtype: type) -> None:
    top = np.iinfo(dtype).max
    colour: np.ndarray = astronaut((64, 16)).astype(dtype) * (257 if dtype == np.uint16 else 1)
    alpha = alpha_ramp(16, 64, dtype)
    picture = Picture(np.dstack([colour, alpha]))
    model = NearestNeighbour()
    out = upscale(picture, (128, 32), (2,), model)
    assert len(model.calls) == model_runs(4, False, [2]) == 2
    np.testing.assert_array_equal(out.pixels[..., 3], nearest(alpha[..., None], 2)[..., 0])
    visible = nearest(alpha[..., None], 2)[..., 0] >= top // 4
    error = np.abs(out.pixels[..., :3].astype(np.int64) - nearest(colour, 2).astype(np.int64))
    assert error[visible].max() <= 2 * (257 if dtype == np.uint16 else 1)


def test_alpha_at_a_fractional_scale_follows_the_resampled_ramp() -> None:
    picture = Picture(np.dstack([astronaut((64, 16)), alpha_ramp(16, 64)]))
    out = upscale(picture, (88, 22), (4,), nearest)
    expected = np.linspace(0, 255, 88)
    assert np.abs(out.pixels[11, :, 3].astype(float) - expected).max() < 8


def test_gray_with_alpha_stays_gray_with_alpha() -> None:
    gray = astronaut((40, 20)).mean(axis=2).astype(np.uint8)
    alpha = alpha_ramp(20, 40)
    out = upscale(Picture(np.dstack([gray, alpha])), (80, 40), (2,), nearest)
    assert out.channels == 2
    np.testing.assert_array_equal(out.pixels[..., 1], nearest(alpha[..., None], 2)[..., 0])
    visible = nearest(alpha[..., None], 2)[..., 0] >= 64
    assert np.abs(out.pixels[..., 0].astype(int) - nearest(gray[..., None], 2)[..., 0])[visible].max() <= 2


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_grayscale_runs_as_colour_and_comes_back_gray(dtype: type) -> None:
    gray = (astronaut((40, 30)).mean(axis=2, keepdims=True) * (257 if dtype == np.uint16 else 1)).astype(dtype)
    model = NearestNeighbour()
    out = upscale(Picture(gray), (120, 90), (3,), model)
    assert model.calls == [((30, 40, 3), 3)]
    assert out.channels == 1 and out.pixels.dtype == dtype
    np.testing.assert_array_equal(out.pixels, nearest(gray, 3))


def test_16_bit_stays_16_bit_end_to_end() -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 65536, (12, 16, 3), dtype=np.uint16)
    out = upscale(Picture(pixels), (64, 48), (4,), nearest)
    assert out.pixels.dtype == np.uint16 and out.bit_depth == 16
    np.testing.assert_array_equal(out.pixels, nearest(pixels, 4))
    shrunk = upscale(Picture(pixels), (8, 6), (4,), nearest)
    assert shrunk.pixels.dtype == np.uint16 and (shrunk.width, shrunk.height) == (8, 6)


def test_icc_profile_is_kept() -> None:
    out = upscale(Picture(astronaut((8, 8)), icc_profile=b"profile"), (16, 16), (2,), nearest)
    assert out.icc_profile == b"profile"


def test_a_model_returning_the_wrong_shape_is_caught() -> None:
    with pytest.raises(RuntimeError, match="run_rgb"):
        upscale(Picture(astronaut((8, 8))), (32, 32), (4,), lambda pixels, scale: nearest(pixels, 2))


def test_model_runs_counts_calls_for_progress() -> None:
    assert model_runs(3, True, [4, 2]) == 2
    assert model_runs(4, True, [4]) == 1
    assert model_runs(4, False, [4, 2]) == 4
    assert model_runs(2, False, [2]) == 2
    assert constant_alpha(Picture(astronaut((8, 8)))) is None
