"""Small natural photos from scikit-image for tests, as uint8 H×W×3 numpy arrays.

Each takes an optional `size` (width, height): the photo is center-cropped to that aspect
ratio, then resized with Lanczos, so any size still shows real texture and edges.
"""
from __future__ import annotations

import numpy as np
import skimage.data
from PIL import Image


def _fit(photo: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return photo
    width, height = size
    rows, cols = photo.shape[:2]
    crop_w = min(cols, round(rows * width / height))
    crop_h = min(rows, round(cols * height / width))
    top, left = (rows - crop_h) // 2, (cols - crop_w) // 2
    cropped = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
    return np.asarray(cropped.resize((width, height), Image.Resampling.LANCZOS))


def astronaut(size: tuple[int, int] | None = (128, 128)) -> np.ndarray:
    """Portrait with a face, fabric and a flag (512×512 when `size` is None)."""
    return _fit(skimage.data.astronaut(), size)


def coffee(size: tuple[int, int] | None = (240, 160)) -> np.ndarray:
    """A coffee cup on a table: smooth gradients and specular highlights (600×400 when `size` is None)."""
    return _fit(skimage.data.coffee(), size)


def chelsea(size: tuple[int, int] | None = (180, 120)) -> np.ndarray:
    """A cat: fur and whiskers, fine high-frequency detail (451×300 when `size` is None)."""
    return _fit(skimage.data.chelsea(), size)
