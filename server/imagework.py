"""The steps of one image's work, shared by every caller: HTTP (serving.py), the folder batch (batch.py).

    bytes ─► source_image (header: format, size, limits) ─► Job ─► decode ─► LocalEngine.plan / upscale ─► encode

Each step is a plain function, so that a batch can run them in separate threads and overlap one file's
decode and encode with another's model run.
"""
from __future__ import annotations

from server import imaging
from server.errors import InvalidInput
from server.imaging import Picture
from server.jobs import OutputFormat, SourceImage


def source_image(data: bytes, filename: str, max_pixels: int) -> SourceImage:
    """The image's header facts; InvalidInput for what is no supported still image or has too many pixels."""
    if not data:
        raise InvalidInput("the image is empty", "image")
    info = imaging.probe(data)
    if info.width * info.height > max_pixels:
        raise InvalidInput(f"the image is {info.width}x{info.height}, over the limit of {max_pixels} "
                           "pixels (LOUPE_MAX_INPUT_PIXELS)", "image", code="IMAGE_TOO_LARGE")
    return SourceImage(data=data, width=info.width, height=info.height, format=info.format, filename=filename,
                       alpha=info.alpha)


def decode(source: SourceImage, max_pixels: int) -> Picture:
    return imaging.decode(source.data, max_pixels=max_pixels)


def encode(pictures: list[Picture], fmt: OutputFormat, compression: int | None) -> list[bytes]:
    """Each picture as a file; a picture listed several times (a deterministic model's n copies) is encoded once."""
    encoded: dict[int, bytes] = {}
    for picture in pictures:
        if id(picture) not in encoded:
            encoded[id(picture)] = imaging.encode(picture, fmt, compression)
    return [encoded[id(picture)] for picture in pictures]
