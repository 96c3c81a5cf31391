"""Turn finished images into what the client asked for: stored URLs or base64, in its format.

Local results arrive encoded in the requested format; remote ones as the provider made
them, kept as they are when they already match the requested format and re-encoded when not.
"""
from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

from server import imaging
from server.api.protocol import ImageData
from server.errors import InvalidInput
from server.jobs import Job
from server.storage import ResultStore


@dataclass(frozen=True)
class Published:
    items: list[ImageData]
    size: tuple[int, int]  # of the first image


def _convert_remote(data: bytes, job: Job, max_pixels: int) -> tuple[bytes, tuple[int, int]]:
    info = imaging.probe(data)
    native = imaging.default_output_format(info.format)
    if native == job.output_format and job.output_compression is None:
        return data, (info.width, info.height)
    if info.width * info.height > max_pixels:
        raise InvalidInput(
            f"the provider made a {info.width}x{info.height} image, over the {max_pixels} pixels Loupe converts: "
            f"ask for output_format={native} without output_compression to get it as it was made",
            "output_format",
        )
    picture = imaging.decode(data, max_pixels=max_pixels)
    return imaging.encode(picture, job.output_format, job.output_compression), (picture.width, picture.height)


async def publish_local(images: list[bytes], size: tuple[int, int], job: Job, store: ResultStore,
                        base_url: str) -> Published:
    """The engine's encoded results (a deterministic model's n copies share one object, stored once)."""
    return Published(await _deliver(images, job, store, base_url), size)


async def publish_remote(images: list[bytes], job: Job, store: ResultStore, base_url: str, max_pixels: int) -> Published:
    """Images over `max_pixels` are published only in the format the provider made them in."""
    converted = [await asyncio.to_thread(_convert_remote, data, job, max_pixels) for data in images]
    blobs = [data for data, _ in converted]
    return Published(await _deliver(blobs, job, store, base_url), converted[0][1])


async def _deliver(blobs: list[bytes], job: Job, store: ResultStore, base_url: str) -> list[ImageData]:
    """Equal images (a deterministic model's n copies, whichever process made them) are encoded or stored once."""
    if job.response_format == "b64_json":
        encoded: dict[bytes, str] = {}
        for blob in blobs:
            if blob not in encoded:
                encoded[blob] = base64.b64encode(blob).decode("ascii")
        return [ImageData(b64_json=encoded[blob]) for blob in blobs]
    names: dict[bytes, str] = {}
    for blob in blobs:
        if blob not in names:
            names[blob] = await asyncio.to_thread(store.save, blob, job.output_format)
    return [ImageData(url=f"{base_url}/results/{names[blob]}") for blob in blobs]
