"""The normalized request: what the engine and the remote providers are given.

The HTTP layer builds a Job from a multipart form; nothing after it sees
FastAPI, form strings or multipart parts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from server.catalog import ModelEntry
from server.errors import InvalidInput

OutputFormat = Literal["png", "jpeg", "webp", "gif", "avif"]
ResponseFormat = Literal["url", "b64_json"]

# Pillow's format name → media type, for the images clients send and for those Loupe writes (an output
# format is the lower-case name). A camera's MPO is a JPEG to everyone else.
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp",
               "GIF": "image/gif", "AVIF": "image/avif", "TIFF": "image/tiff", "BMP": "image/bmp"}
EXTENSIONS: dict[OutputFormat, str] = {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif", "avif": "avif"}
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")


def parse_size(text: str) -> tuple[int, int] | None:
    """(width, height) of a "2048x1536"; None when it isn't one."""
    match = _SIZE.match(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def media_type(fmt: str) -> str:
    """Of a Pillow format name ("PNG", "MPO") or an output format ("png", "jpeg")."""
    return MEDIA_TYPES[fmt.upper()]


@dataclass(frozen=True)
class SourceImage:
    """The client's image as received: the bytes, and what its header says."""

    data: bytes
    width: int
    height: int
    format: str  # Pillow's format name: "PNG", "JPEG", ...
    filename: str = "image"
    alpha: bool = False  # the header allows transparency

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES.get(self.format, f"image/{self.format.lower()}")


@dataclass(frozen=True)
class Job:
    request_id: str
    requested_model: str
    entry: ModelEntry
    image: SourceImage
    scale: float
    target: tuple[int, int]  # exact output width, height
    output_format: OutputFormat
    response_format: ResponseFormat = "url"
    output_compression: int | None = None
    n: int = 1
    seed: int | None = None
    prompt: str | None = None
    user: str | None = None
    scale_given: bool = True  # False when the model's default scale applied
    size_given: str | None = None  # the client's `size` field, when it sent one
    extra: dict[str, str] = field(default_factory=dict)  # fields Loupe does not know: passed to remote providers


def resolve_target(entry: ModelEntry, width: int, height: int, scale: float | None,
                   size: tuple[int, int] | None) -> tuple[float, tuple[int, int]]:
    """The scale and exact output size of a `width`×`height` image, from a scale or a size (never both; neither:
    the model's default scale). A size must keep the image's aspect ratio, to a pixel."""
    if size is not None:
        if scale is not None:
            raise InvalidInput("give scale_factor or size, not both", "size")
        target_w, target_h = size
        if target_w < 1 or target_h < 1:
            raise InvalidInput("size must be at least 1x1", "size")
        scale = target_w / width
        if abs(round(height * scale) - target_h) > 1 and abs(round(width * target_h / height) - target_w) > 1:
            raise InvalidInput(
                f"size {target_w}x{target_h} does not keep the input's aspect ratio ({width}x{height}); "
                "use scale_factor, or a size with the same ratio",
                "size",
            )
        _check_scale(entry, scale, "size")
        return scale, (target_w, target_h)
    scale = scale if scale is not None else entry.default_scale
    _check_scale(entry, scale, "scale_factor")
    return scale, (max(1, round(width * scale)), max(1, round(height * scale)))


def _check_scale(entry: ModelEntry, scale: float, param: str) -> None:
    if not entry.scale.allows(scale):
        raise InvalidInput(f"{entry.id} takes a scale {entry.scale.describe()}, not {scale:g}", param)
