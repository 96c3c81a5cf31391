"""Image bytes in and out: what a client notices about the files it sends and gets back."""
from __future__ import annotations

import io
import struct
import time
import tracemalloc
import warnings
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageOps

from server.api.errors import status_of
from server.errors import LoupeError
from server.jobs import media_type
from server.imaging import (
    Picture,
    decode,
    default_output_format,
    encode,
    probe,
    resize,
)
from tests.photos import astronaut, coffee

LIMIT = 50_000_000
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
GRAY_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # any non-RGB space


def pillow_bytes(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def with_alpha(rgb: np.ndarray) -> np.ndarray:
    """The photo with an alpha ramp from transparent (left) to opaque (right)."""
    height, width = rgb.shape[:2]
    ramp = np.broadcast_to(np.linspace(0, 255, width).astype(np.uint8), (height, width))
    return np.dstack([rgb, ramp])


def layouts(photo: np.ndarray) -> dict[str, np.ndarray]:
    gray = photo.mean(axis=2, keepdims=True).astype(np.uint8)
    rgba = with_alpha(photo)
    return {"L": gray, "LA": np.dstack([gray, rgba[..., 3]]), "RGB": photo, "RGBA": rgba}


def decoded(data: bytes) -> Picture:
    return decode(data, max_pixels=LIMIT)


def refused(data: bytes) -> LoupeError:
    with pytest.raises(LoupeError) as caught:
        decoded(data)
    assert status_of(caught.value) == 400 and caught.value.param == "image"
    return caught.value


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("layout", ["L", "LA", "RGB", "RGBA"])
def test_png_round_trip_is_exact_in_every_layout(layout: str) -> None:
    pixels = layouts(astronaut((96, 64)))[layout]
    picture = decoded(encode(Picture(pixels), "png"))
    assert picture.pixels.dtype == np.uint8
    np.testing.assert_array_equal(picture.pixels, pixels)


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif", "gif"])
@pytest.mark.parametrize("layout", ["L", "RGB", "RGBA"])
def test_lossy_formats_round_trip_close_to_the_original(fmt: str, layout: str) -> None:
    pixels = layouts(coffee((120, 80)))[layout]
    data = encode(Picture(pixels), fmt)  # type: ignore[arg-type]
    assert Image.open(io.BytesIO(data)).format == fmt.upper()
    picture = decoded(data)
    assert (picture.width, picture.height) == (120, 80)
    colour = picture.pixels[..., : 1 if layout == "L" else 3].astype(int)
    expected = pixels[..., : 1 if layout == "L" else 3].astype(int)
    if layout == "RGBA" and fmt == "jpeg":
        alpha = pixels[..., 3:].astype(int)
        expected = (expected * alpha + 255 * (255 - alpha)) // 255  # JPEG has no alpha: flattened on white
    if colour.shape[2] != expected.shape[2]:  # WebP stores gray as colour
        colour = colour.mean(axis=2, keepdims=True)
    opaque = pixels[..., -1] > 200 if layout == "RGBA" and fmt != "jpeg" else np.ones(pixels.shape[:2], bool)
    assert np.abs(colour - expected)[opaque].mean() < 6


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "AVIF", "BMP"])
def test_every_input_format_decodes(fmt: str) -> None:
    photo = astronaut((64, 48))
    source = Image.fromarray(photo)
    data = pillow_bytes(source, fmt)
    info = probe(data)
    assert (info.width, info.height, info.format) == (64, 48, fmt)
    picture = decoded(data)
    assert picture.pixels.shape == (48, 64, 3) and picture.pixels.dtype == np.uint8
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(picture.pixels, reference)


def test_a_gif_keeps_its_transparency() -> None:
    first = np.zeros((20, 30, 4), np.uint8)
    first[..., 0] = 200
    first[..., 3] = 255
    first[:, :10, 3] = 0
    picture = decoded(pillow_bytes(Image.fromarray(first), "GIF"))
    assert picture.channels == 4
    assert (picture.pixels[:, :10, 3] == 0).all() and (picture.pixels[:, 10:, 3] == 255).all()
    assert (picture.pixels[:, 10:, 0] == 200).all()


def test_gif_output_keeps_transparent_areas_transparent() -> None:
    pixels = with_alpha(astronaut((40, 30)))
    picture = decoded(encode(Picture(pixels), "gif"))
    assert (picture.pixels[..., 3] == 0).sum() == (pixels[..., 3] < 128).sum()


def test_jpeg_output_flattens_transparency_onto_white() -> None:
    pixels = np.zeros((16, 16, 4), np.uint8)  # black, fully transparent
    picture = decoded(encode(Picture(pixels), "jpeg"))
    assert picture.channels == 3 and picture.pixels.min() >= 250


# --------------------------------------------------------------------------- what decoding keeps


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(orientation: int, fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = pillow_bytes(Image.fromarray(astronaut((40, 24))), fmt, exif=exif, **options)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    picture = decoded(data)
    np.testing.assert_array_equal(picture.pixels, upright)
    info = probe(data)
    assert (info.height, info.width) == upright.shape[:2]
    if orientation >= 5:
        assert (info.width, info.height) == (24, 40)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "avif"])
def test_icc_profile_survives_decode_and_encode(fmt: str) -> None:
    source = pillow_bytes(Image.fromarray(astronaut((32, 32))), "PNG", icc_profile=SRGB)
    picture = decoded(source)
    assert picture.icc_profile == SRGB
    output = Image.open(io.BytesIO(encode(picture, fmt)))  # type: ignore[arg-type]
    assert output.info.get("icc_profile") == SRGB


def test_a_profile_that_does_not_fit_the_pixels_is_not_written() -> None:
    gray = Picture(np.zeros((8, 8, 1), np.uint8), icc_profile=SRGB)  # an RGB profile on gray pixels
    assert "icc_profile" not in Image.open(io.BytesIO(encode(gray, "png"))).info
    odd = Picture(np.zeros((8, 8, 3), np.uint8), icc_profile=GRAY_PROFILE)
    assert "icc_profile" not in Image.open(io.BytesIO(encode(odd, "jpeg"))).info


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_grayscale_stays_grayscale(fmt: str) -> None:
    gray = layouts(astronaut((48, 32)))["L"][..., 0]
    picture = decoded(pillow_bytes(Image.fromarray(gray), fmt))
    assert picture.channels == 1
    assert Image.open(io.BytesIO(encode(picture, "png"))).mode == "L"
    assert Image.open(io.BytesIO(encode(picture, "jpeg"))).mode == "L"


def test_gray_gif_decodes_to_one_channel() -> None:
    gray = layouts(astronaut((48, 32)))["L"][..., 0]
    picture = decoded(pillow_bytes(Image.fromarray(gray), "GIF"))
    assert picture.channels == 1
    np.testing.assert_array_equal(picture.pixels[..., 0], gray)


def test_palette_with_transparency_becomes_rgba_and_cmyk_becomes_rgb() -> None:
    paletted = Image.fromarray(astronaut((32, 32))).quantize(16)
    paletted.info["transparency"] = 0
    picture = decoded(pillow_bytes(paletted, "PNG", transparency=0))
    assert picture.channels == 4 and (picture.pixels[..., 3] == 0).any()
    cmyk = Image.fromarray(astronaut((32, 32))).convert("CMYK")
    picture = decoded(pillow_bytes(cmyk, "JPEG", quality=95))
    assert picture.channels == 3 and picture.icc_profile is None
    assert np.abs(picture.pixels.astype(int) - np.asarray(cmyk.convert("RGB")).astype(int)).mean() < 4


# --------------------------------------------------------------------------- 16 bits


def deep(channels: int, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """A 16-bit picture whose values use all 16 bits (not 8-bit values times 257)."""
    rng = np.random.default_rng(channels)
    return rng.integers(0, 65536, (size[1], size[0], channels), dtype=np.uint16)


def opencv_png(pixels: np.ndarray, ext: str = ".png") -> bytes:
    order = {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}[pixels.shape[2]]
    ok, buffer = cv2.imencode(ext, np.ascontiguousarray(pixels[..., order]))
    assert ok
    return buffer.tobytes()


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_16_bit_files_decode_to_uint16(channels: int, ext: str) -> None:
    pixels = deep(channels)
    picture = decoded(opencv_png(pixels, ext))
    assert picture.pixels.dtype == np.uint16 and picture.bit_depth == 16
    np.testing.assert_array_equal(picture.pixels, pixels)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_png_output_stays_16_bit(channels: int) -> None:
    pixels = deep(channels)
    data = encode(Picture(pixels), "png")
    np.testing.assert_array_equal(decoded(data).pixels, pixels)
    if channels != 2:  # OpenCV, an independent PNG reader, has no gray+alpha
        read = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        order = {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}[channels]
        assert read is not None and read.dtype == np.uint16
        np.testing.assert_array_equal(read.reshape(pixels.shape)[..., order], pixels)


def test_16_bit_goes_to_8_bit_in_formats_without_it() -> None:
    pixels = np.full((8, 8, 3), 257 * 200, np.uint16)
    picture = decoded(encode(Picture(pixels), "webp", compression=100))
    assert picture.pixels.dtype == np.uint8 and abs(int(picture.pixels.mean()) - 200) <= 1


# --------------------------------------------------------------------------- refusals


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 1000)  # a few rows of data: far fewer than the header claims
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_its_header() -> None:
    data = png_header(100_000, 100_000)
    assert probe(data).width == 100_000
    tracemalloc.start()
    started = time.perf_counter()
    error = refused(data)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert error.code == "IMAGE_TOO_LARGE" and "100000×100000" in error.message
    assert elapsed < 1 and peak < 5_000_000


def test_the_pixel_limit_is_the_callers() -> None:
    data = pillow_bytes(Image.new("RGB", (100, 100)), "PNG")
    assert decode(data, max_pixels=10_000).width == 100
    with pytest.raises(LoupeError) as caught:
        decode(data, max_pixels=9_999)
    assert caught.value.code == "IMAGE_TOO_LARGE"


def test_broken_files_are_refused_with_a_400() -> None:
    png = pillow_bytes(Image.fromarray(astronaut((64, 64))), "PNG")
    jpeg = pillow_bytes(Image.fromarray(astronaut((64, 64))), "JPEG")
    assert refused(b"").message == "The image is empty."
    assert refused(b"this is a text file named photo.png\n").code == "UNSUPPORTED_IMAGE_FORMAT"
    assert refused(png[: len(png) // 2]).code == "INVALID_IMAGE"
    assert refused(jpeg[: len(jpeg) // 2]).code == "INVALID_IMAGE"
    corrupt = bytearray(png)
    corrupt[60:80] = b"\xff" * 20
    refused(bytes(corrupt))
    with pytest.raises(LoupeError):
        probe(b"GIF89a")


def test_formats_pillow_knows_but_loupe_does_not_take_are_refused() -> None:
    refused(pillow_bytes(Image.new("RGB", (8, 8)), "ICO"))
    refused(pillow_bytes(Image.new("RGB", (8, 8)), "PPM"))


VALID_SAMPLES = [
    pillow_bytes(Image.fromarray(astronaut((24, 16))), fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")
] + [opencv_png(deep(3, (12, 8))), encode(Picture(deep(2, (12, 8))), "png")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample=st.sampled_from(VALID_SAMPLES),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, 10_000),
)
def test_mutated_files_only_ever_raise_api_errors(sample: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(sample)
    for position, value in edits:
        data[position % len(data)] = value
    data = data[: max(1, len(data) - cut % len(data))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            probe(bytes(data))
            decoded(bytes(data))
        except LoupeError as error:
            assert status_of(error) == 400 and error.param == "image"
    assert [str(w.message) for w in caught] == []


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_api_errors(data: bytes) -> None:
    with pytest.raises(LoupeError):
        decoded(data)


# --------------------------------------------------------------------------- encoding options


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif"])
def test_output_compression_is_the_quality_of_lossy_formats(fmt: str) -> None:
    picture = Picture(astronaut((128, 128)))
    low, high = (len(encode(picture, fmt, compression=value)) for value in (20, 95))  # type: ignore[arg-type]
    assert low < high * 0.7


def test_output_compression_is_the_zlib_effort_of_png() -> None:
    picture = Picture(coffee((240, 160)))
    stored, default, smallest = (len(encode(picture, "png", value)) for value in (0, None, 100))
    assert stored > picture.pixels.nbytes > default > smallest
    for data in (encode(picture, "png", value) for value in (0, 100)):
        np.testing.assert_array_equal(decoded(data).pixels, picture.pixels)


def test_output_compression_out_of_range_is_refused() -> None:
    with pytest.raises(LoupeError) as caught:
        encode(Picture(np.zeros((4, 4, 3), np.uint8)), "jpeg", compression=101)
    assert status_of(caught.value) == 400 and caught.value.param == "output_compression"


def test_webp_larger_than_it_can_store_is_refused() -> None:
    with pytest.raises(LoupeError) as caught:
        encode(Picture(np.zeros((1, 16_384, 3), np.uint8)), "webp")
    assert status_of(caught.value) == 400 and caught.value.param == "output_format"


def test_large_png_is_split_into_bands_that_any_reader_accepts() -> None:
    pixels = np.ascontiguousarray(np.tile(coffee((600, 400)), (4, 3, 1)))  # 1800×1600: several bands
    data = encode(Picture(pixels), "png")
    assert data.count(b"IDAT") > 3
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    read = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert read is not None
    np.testing.assert_array_equal(read[..., ::-1], pixels)
    assert len(data) < len(pillow_bytes(Image.fromarray(pixels), "PNG", compress_level=1))


def test_media_types_and_default_formats() -> None:
    assert [media_type(f) for f in ("png", "jpeg", "webp", "gif", "avif")] == [
        "image/png",
        "image/jpeg",
        "image/webp",
        "image/gif",
        "image/avif",
    ]
    assert default_output_format("JPEG") == "jpeg" and default_output_format("MPO") == "jpeg"
    assert default_output_format("WEBP") == "webp" and default_output_format("AVIF") == "avif"
    assert {default_output_format(f) for f in ("PNG", "GIF", "TIFF", "BMP")} == {"png"}


# --------------------------------------------------------------------------- resize


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("size", [(173, 129), (31, 20)])
def test_resize_keeps_dtype_and_channels(channels: int, dtype: type, size: tuple[int, int]) -> None:
    photo = layouts(astronaut((70, 50)))["RGBA"]
    pixels: np.ndarray = np.ascontiguousarray(photo[..., :channels]).astype(dtype) * (257 if dtype == np.uint16 else 1)
    out = resize(pixels, *size)
    assert out.shape == (size[1], size[0], channels) and out.dtype == dtype
    for channel in range(channels):  # each channel resampled like Pillow's Lanczos would
        reference = Image.fromarray(np.ascontiguousarray(pixels[..., channel])).resize(size, Image.Resampling.LANCZOS)
        assert np.abs(out[..., channel].astype(int) - np.asarray(reference).astype(int)).max() <= 1


def test_resize_in_parallel_bands_matches_one_pass() -> None:
    pixels = coffee((600, 400))
    for size in ((1500, 1000), (451, 300)):
        whole = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS)).astype(int)
        assert np.abs(resize(pixels, *size).astype(int) - whole).max() <= 1


def test_resize_of_a_flat_picture_stays_flat() -> None:
    flat = np.full((10, 10, 3), 77, np.uint8)
    assert (resize(flat, 37, 23) == 77).all() and (resize(flat, 3, 4) == 77).all()
