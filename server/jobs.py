"""The normalized request: what the engine and the remote providers are given.

The HTTP layer builds a Job from a multipart form; nothing after it sees
FastAPI, form strings or multipart parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server.catalog import ModelEntry

OutputFormat = Literal["png", "jpeg", "webp", "gif", "avif"]
ResponseFormat = Literal["url", "b64_json"]

# Pillow's format name → media type, for the images clients send and for those Loupe writes (an output
# format is the lower-case name). A camera's MPO is a JPEG to everyone else.
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp",
               "GIF": "image/gif", "AVIF": "image/avif", "TIFF": "image/tiff", "BMP": "image/bmp"}
EXTENSIONS: dict[OutputFormat, str] = {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif", "avif": "avif"}


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
