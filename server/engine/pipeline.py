"""One picture to an exact size with any model: native passes, then an exact resample.

The model only ever sees RGB (`run_rgb`). Grayscale runs as three equal channels and comes
back gray. A constant alpha is re-attached; any other alpha is recovered by running the
picture twice, composited over black and over white: where the model returns
`black = colour·α` and `white = colour·α + max·(1 − α)`, `α = 1 − (white − black) / max`
and `colour = black / α`. 16-bit pictures stay uint16 throughout, and the alpha maths runs
in row blocks so no full-size float copy is ever made.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from server.imaging import Picture, resize, row_blocks

RunRgb = Callable[[np.ndarray, int], np.ndarray]
"""run_rgb(pixels H×W×3 uint8|uint16, native_scale) -> (H·s)×(W·s)×3 of the same dtype."""

_SLACK = 1e-9  # a product of passes within this ratio of the scale counts as reaching it


def plan_passes(scale: float, natives: Sequence[int]) -> list[int]:
    """Native scales to run, largest first: the fewest passes reaching `scale`, then the least overshoot.

    At or below 1× one pass of the smallest native scale runs, and the resample shrinks it.
    """
    options = sorted(set(natives), reverse=True)
    if not options or options[-1] < 1 or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"cannot plan scale {scale} with native scales {list(natives)}")
    if scale <= 1 or options[0] == 1:  # a 1× network runs once; the resample makes any scale
        return [options[-1]]
    needed = scale * (1 - _SLACK)
    count = 1
    while options[0] ** count < needed:
        count += 1
    # Combinations drawn from descending options come out largest first.
    reaching = [c for c in itertools.combinations_with_replacement(options, count) if math.prod(c) >= needed]
    return list(min(reaching, key=math.prod))


def model_input_size(size: tuple[int, int], target: tuple[int, int], passes: Sequence[int],
                     max_side: int) -> tuple[int, int]:
    """What the picture is resampled to before its first pass, so that a job's work is bounded by its output.

    At or below 1× the model's input shrinks until its output just covers the target. Above 1× the input is
    kept, unless the passes would make an intermediate over `max_side` a side; then it shrinks to fit, never
    below what covers the target.
    """
    width, height = size
    product = math.prod(passes)
    covering = (math.ceil(target[0] / product), math.ceil(target[1] / product))
    if target[0] <= width and target[1] <= height:
        return min(width, covering[0]), min(height, covering[1])
    factor = min(1.0, max_side / (max(width, height) * product))
    return (max(covering[0], min(width, math.floor(width * factor))),
            max(covering[1], min(height, math.floor(height * factor))))


def constant_alpha(picture: Picture) -> int | None:
    """The value of a picture's alpha channel when it is the same everywhere; None otherwise or without alpha."""
    if not picture.has_alpha:
        return None
    alpha = picture.pixels[..., -1]
    low = alpha.min()
    return int(low) if low == alpha.max() else None


def model_runs(picture_channels: int, alpha_is_constant: bool, passes: list[int]) -> int:
    """How many times upscale_picture calls run_rgb: twice per pass for a varying alpha."""
    has_alpha = picture_channels in (2, 4)
    return len(passes) * (2 if has_alpha and not alpha_is_constant else 1)


def upscale_picture(picture: Picture, target: tuple[int, int], passes: Sequence[int], run_rgb: RunRgb,
                    model_input: tuple[int, int] | None = None) -> Picture:
    """`picture`, resampled to `model_input` (see `model_input_size`) when given, through the native `passes`
    (a job plan's, see `plan_passes`), resampled to exactly `target` (width, height); same channels, bit depth
    and ICC profile."""
    width, height = target
    if width < 1 or height < 1 or not passes:
        raise ValueError(f"target size {target} is empty, or no passes given")
    if model_input is not None and model_input != (picture.width, picture.height):
        picture = picture.with_pixels(resize(picture.pixels, *model_input))

    def upscale_rgb(rgb: np.ndarray) -> np.ndarray:
        return _run_passes(rgb, passes, target, run_rgb)

    pixels = picture.pixels
    colour = pixels[..., :-1] if picture.has_alpha else pixels
    if not picture.has_alpha:
        return picture.with_pixels(_upscale_colour(colour, upscale_rgb))
    alpha = constant_alpha(picture)
    if alpha is None:
        return picture.with_pixels(_upscale_with_alpha(colour, pixels[..., -1], upscale_rgb))
    out = np.empty((height, width, picture.channels), pixels.dtype)
    out[..., :-1] = _upscale_colour(colour, upscale_rgb)
    out[..., -1] = alpha
    return picture.with_pixels(out)


def _run_passes(rgb: np.ndarray, passes: Sequence[int], target: tuple[int, int], run_rgb: RunRgb) -> np.ndarray:
    width, height = target
    for scale in passes:
        expected = (rgb.shape[0] * scale, rgb.shape[1] * scale, 3)
        dtype = rgb.dtype
        rgb = run_rgb(rgb, scale)
        if rgb.shape != expected or rgb.dtype != dtype:
            raise RuntimeError(f"run_rgb gave {rgb.shape} {rgb.dtype} for a ×{scale} pass; expected {expected} {dtype}")
    return resize(rgb, width, height)


def _upscale_colour(colour: np.ndarray, upscale_rgb: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    rgb = upscale_rgb(_as_rgb(colour))
    return rgb if colour.shape[2] == 3 else _as_gray(rgb)


def _upscale_with_alpha(
    colour: np.ndarray, alpha: np.ndarray, upscale_rgb: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Colour and alpha recovered from the picture upscaled over black and over white."""
    maximum = float(np.iinfo(colour.dtype).max)
    over_black, over_white = _composite(colour, alpha)
    black = upscale_rgb(_as_rgb(over_black))
    del over_black
    white = upscale_rgb(_as_rgb(over_white))
    del over_white
    height, width = black.shape[:2]
    channels = colour.shape[2]
    out = np.empty((height, width, channels + 1), colour.dtype)
    for rows in row_blocks(height, width * 3):
        dark = black[rows].astype(np.float32)
        # In sample units, so the sums stay exact integers in float32 even at 16 bits.
        spread = (white[rows].astype(np.float32) - dark).sum(axis=2, keepdims=True)
        alpha = np.clip(maximum - spread / 3, 0, maximum)
        # Below one step of alpha the colour is invisible; the floor keeps it finite.
        recovered = dark * (maximum / np.maximum(alpha, 1))
        if channels == 1:
            recovered = recovered.mean(axis=2, keepdims=True)
        out[rows, :, :-1] = np.rint(np.clip(recovered, 0, maximum))
        out[rows, :, -1:] = np.rint(alpha)
    return out


def _composite(colour: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The colour channels composited over black and over white, in the input's dtype."""
    maximum = float(np.iinfo(colour.dtype).max)
    over_black, over_white = np.empty_like(colour), np.empty_like(colour)
    height, width, channels = colour.shape
    for rows in row_blocks(height, width * channels):
        opacity = alpha[rows, :, None]
        premultiplied = np.rint(colour[rows].astype(np.float32) * (opacity / np.float32(maximum)))
        over_black[rows] = premultiplied
        # White shows through by (maximum - alpha): an exact integer, so white - black is too.
        over_white[rows] = premultiplied + (maximum - opacity.astype(np.float32))
    return over_black, over_white


def _as_rgb(colour: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(colour) if colour.shape[2] == 3 else np.repeat(colour, 3, axis=2)


def _as_gray(rgb: np.ndarray) -> np.ndarray:
    """The mean of the three channels (they started equal; the model may drift them apart a little)."""
    height, width = rgb.shape[:2]
    gray = np.empty((height, width, 1), rgb.dtype)
    for rows in row_blocks(height, width * 3):
        gray[rows] = (rgb[rows].sum(axis=2, keepdims=True, dtype=np.uint32) + 1) // 3
    return gray
