"""Image bytes in and out: header probe, decode, encode and exact-size resampling.

Decoding keeps what a client would notice losing: EXIF orientation is applied (and the rest
of the EXIF kept, to be written back with the upright orientation and the new size), the ICC
profile kept, grayscale stays grayscale, alpha stays alpha and 16-bit stays 16-bit (Pillow
reads 16-bit colour PNG/TIFF as 8-bit, so those go through OpenCV). Anything wrong with the
client's bytes becomes an `InvalidInput` on `image`, checked from the header before decoding.

Encoding writes PNG itself: rows get the "Up" filter and are deflated in parallel bands
(on a 10240² photo: about half the CPU of Pillow's or OpenCV's writer for the same file size,
spread over every core). The other formats go through Pillow.
"""
from __future__ import annotations

import io
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageCms, TiffImagePlugin, UnidentifiedImageError
from zlib_ng import zlib_ng

from server.errors import InvalidInput
from server.jobs import OutputFormat

# decode() enforces the configured limit from the header before any pixel is decoded;
# Pillow's own guard has a fixed threshold that would refuse (or warn about) files the
# configured limit allows, and it fires inside Image.open where probe() needs the size.
Image.MAX_IMAGE_PIXELS = None

INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "AVIF", "BMP")
DEFAULT_QUALITY = {"jpeg": 90, "webp": 90, "avif": 80}
# Deflate level for PNG when the client sends no compression. PNGs are deflated with zlib-ng:
# its level 3 makes the files stock zlib's level 4 makes (on a 1920×1280 upscale, 2.39 MB
# against 2.40), in half the time (66 ms against 126, one core); its level 1 is faster still
# but 50% larger, and level 6 only 6% smaller for 3× the time.
DEFAULT_PNG_LEVEL = 3

_WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_BLOCK_ITEMS = 1 << 22  # array elements per row block: keeps float32 temporaries around 16 MB
_MAX_SIDE = {"jpeg": 65_500, "webp": 16_383, "gif": 65_535}
_JPEG_MAX_EXIF = 65_533  # one APP1 segment; a larger block (from a PNG, say) is left out of a JPEG
_EXIF_IFD = 0x8769
_PIXEL_SIZE_TAGS = (0xA002, 0xA003)  # PixelXDimension, PixelYDimension, in the Exif IFD
# ImageWidth, ImageLength, BitsPerSample, Compression, PhotometricInterpretation, StripOffsets, SamplesPerPixel,
# RowsPerStrip, StripByteCounts, PlanarConfiguration, Predictor, TileWidth, TileLength, TileOffsets,
# TileByteCounts, ExtraSamples, SampleFormat, and the ICC profile (InterColorProfile).
_TIFF_LAYOUT_TAGS = (256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 322, 323, 324, 325, 338, 339, 34675)
_EXIF_PREFIX = b"Exif\x00\x00"
_OWN_FORMATS: dict[str, OutputFormat] = {"JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "AVIF": "avif"}
_PIL_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}
# EXIF orientation -> (transpose, flip rows, flip columns) that brings the pixels upright.
_ORIENTATIONS = {
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),
    7: (True, True, True),
    8: (True, True, False),
}
_ICC_SPACES = {1: b"GRAY", 2: b"GRAY", 3: b"RGB ", 4: b"RGB "}


@dataclass
class Picture:
    """Decoded pixels, H×W×C with C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA), uint8 or uint16."""

    pixels: np.ndarray
    icc_profile: bytes | None = None
    exif: bytes | None = None  # as Pillow writes it ("Exif\0\0" + TIFF), its orientation already applied

    def __post_init__(self) -> None:
        shape, dtype = self.pixels.shape, self.pixels.dtype
        if len(shape) != 3 or shape[2] not in (1, 2, 3, 4) or dtype not in (np.uint8, np.uint16):
            raise ValueError(f"a Picture needs H×W×C pixels with C in 1..4, uint8 or uint16; got {shape} {dtype}")

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def has_alpha(self) -> bool:
        return self.channels in (2, 4)

    @property
    def bit_depth(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    def with_pixels(self, pixels: np.ndarray) -> Picture:
        """The same picture's metadata on other pixels (resampled, upscaled)."""
        return Picture(pixels, self.icc_profile, self.exif)


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as displayed: EXIF orientation applied
    height: int
    format: str  # Pillow's format name: "PNG", "JPEG", "MPO", ...
    alpha: bool = False  # the header allows transparency (whether any pixel uses it, only decoding tells)


def probe(data: bytes) -> ImageInfo:
    """Size and format from the header alone; a 400 on `image` if the bytes are no supported image."""
    with _client_image(data) as image:
        width, height = image.size
        if _orientation(_exif(image)) in (5, 6, 7, 8):
            width, height = height, width
        return ImageInfo(width, height, str(image.format), _may_have_alpha(image))


def decode(data: bytes, *, max_pixels: int) -> Picture:
    """The first frame, upright, in its own channel layout and bit depth.

    Refused with IMAGE_TOO_LARGE from the header when it has more than `max_pixels` pixels.
    """
    with _client_image(data) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidInput(
                f"The image is {width}×{height} pixels ({width * height / 1e6:.1f} megapixels); "
                f"the limit is {max_pixels / 1e6:.1f} megapixels.",
                "image",
                code="IMAGE_TOO_LARGE",
            )
        exif = _exif(image)
        orientation = _orientation(exif)
        icc = image.info.get("icc_profile") or None
        layout = _deep_colour_layout(data, image)
        if layout is None:
            pixels, icc = _pixels_from_pillow(image, icc)
        else:
            pixels = _pixels_from_opencv(data, gray=layout == "gray", size=(width, height))
    pixels = _upright(pixels, orientation)
    return Picture(pixels, icc if icc is not None and _icc_fits(icc, pixels.shape[2]) else None,
                   _upright_exif(exif) if exif else None)


def encode(picture: Picture, fmt: OutputFormat, compression: int | None = None) -> bytes:
    """The picture as a file of `fmt`.

    `compression` is OpenAI's `output_compression` (0-100): the quality for jpeg, webp and
    avif; for png the deflate effort (0 stores, 100 is level 8); ignored for gif. PNG keeps
    16 bits, the other formats get 8; jpeg has no alpha, so it is flattened onto white.
    """
    if compression is not None and not 0 <= compression <= 100:
        raise InvalidInput("output_compression must be between 0 and 100.", "output_compression")
    limit = _MAX_SIDE.get(fmt)
    if limit is not None and max(picture.width, picture.height) > limit:
        raise InvalidInput(
            f"{fmt} images can be at most {limit} pixels on a side; this one is {picture.width}×{picture.height}.",
            "output_format",
        )
    if fmt == "png":
        # 100 is level 8: zlib-ng's level 9 is no smaller than its 8, and sometimes larger.
        level = DEFAULT_PNG_LEVEL if compression is None else round(compression * 8 / 100)
        return _encode_png(picture.pixels, level, picture.icc_profile, _sized_exif(picture))
    pixels = _storable(_to_8bit(picture.pixels), fmt)
    icc = picture.icc_profile
    options: dict[str, object] = {}
    exif = _sized_exif(picture)
    if exif is not None and fmt != "gif" and (fmt != "jpeg" or len(exif) <= _JPEG_MAX_EXIF):
        options["exif"] = exif
    if fmt == "gif":
        image = _gif_image(pixels)
    else:
        image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
        options["quality"] = DEFAULT_QUALITY[fmt] if compression is None else compression
        if fmt == "webp":
            options["method"] = 2  # libwebp's default 4 takes 2.2× longer for files about 3% smaller
        if icc is not None and _icc_fits(icc, pixels.shape[2]):
            options["icc_profile"] = icc
    buffer = io.BytesIO()
    image.save(buffer, format=_PIL_FORMATS[fmt], **options)
    return buffer.getvalue()


def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resample (antialiased when shrinking) of an H×W×C array to `height`×`width`.

    Channels are resampled independently (alpha is the caller's business); dtype and channel
    count are kept; `pixels` itself comes back when it already has that size. Horizontal
    bands are resampled in parallel.
    """
    if width < 1 or height < 1:
        raise ValueError(f"cannot resize to {width}×{height}")
    if pixels.shape[:2] == (height, width):
        return pixels
    channels = pixels.shape[2]
    out = np.empty((height, width, channels), pixels.dtype)
    # Pillow resamples an 8-bit RGB triple in one go; anything else goes a channel at a time.
    grouped = pixels.dtype == np.uint8 and channels >= 3
    layers = [slice(0, 3)] if grouped else []
    layers += [slice(c, c + 1) for c in range(3 if grouped else 0, channels)]
    sources = [(layer, _pillow_image(pixels[..., layer])) for layer in layers]
    band_rows = math.ceil(height / max(1, min(_WORKERS, height // 64)))
    bands = [slice(top, min(height, top + band_rows)) for top in range(0, height, band_rows)]

    def resample(task: tuple[slice, Image.Image, slice]) -> None:
        layer, source, rows = task
        band = np.asarray(_resample_band(source, width, height, rows))
        out[rows, :, layer] = band.reshape(band.shape[0], width, -1)

    _parallel_map(resample, [(layer, source, rows) for layer, source in sources for rows in bands])
    return out


def default_output_format(input_format: str) -> OutputFormat:
    """The client's own format where Loupe can write it; PNG otherwise (GIF too: re-quantizing
    an upscaled picture to 256 colours would throw away what the upscale added)."""
    return _OWN_FORMATS.get(input_format.upper(), "png")


def row_blocks(height: int, row_items: int) -> Iterator[slice]:
    """Consecutive row slices of about 4 M elements each, for full-size maths in bounded memory."""
    step = max(1, _BLOCK_ITEMS // max(1, row_items))
    for top in range(0, height, step):
        yield slice(top, min(height, top + step))


# --------------------------------------------------------------------------- decoding


@contextmanager
def _client_image(data: bytes) -> Iterator[Image.Image]:
    """The client's bytes opened by Pillow (header only); any failure reading them is a 400."""
    if not data:
        raise InvalidInput("The image is empty.", "image", code="INVALID_IMAGE")
    # Pillow warns about quirks of files it still reads (corrupt EXIF, odd palettes): they
    # describe the client's file, not a fault to log. Added on every call, which is
    # idempotent, because a catch_warnings() block elsewhere (a test runner's) can drop it.
    warnings.filterwarnings("ignore", module=r"PIL\.")
    try:
        with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as image:
            _refuse_frames(image)
            yield image
    except InvalidInput:
        raise
    except UnidentifiedImageError as exc:
        raise InvalidInput(
            f"The file is not an image in a supported format ({', '.join(INPUT_FORMATS)}).",
            "image",
            code="UNSUPPORTED_IMAGE_FORMAT",
        ) from exc
    except Exception as exc:  # decoders fail on bad input in many ways: OSError, SyntaxError, struct.error...
        raise _corrupt() from exc


def _refuse_frames(image: Image.Image) -> None:
    """An animation or a multi-page file is refused, never cut to its first frame without a word.

    A camera's MPO JPEG is exempt: its further pictures are previews and depth maps of the first.
    """
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":
        kind = "a multi-page TIFF" if image.format == "TIFF" else f"an animated {image.format}"
        raise InvalidInput(f"The image is {kind} with {frames} frames; Loupe upscales still images: send one frame "
                           "(as PNG, say) per request.", "image", code="ANIMATED_IMAGE")


def _may_have_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _corrupt() -> InvalidInput:
    return InvalidInput("The image could not be decoded: it is truncated or corrupt.", "image", code="INVALID_IMAGE")


def _orientation(exif: Image.Exif | None) -> int:
    value = exif.get(ExifTags.Base.Orientation, 1) if exif is not None else 1
    return value if value in _ORIENTATIONS else 1


def _exif(image: Image.Image) -> Image.Exif | None:
    if image.format == "PNG" and "exif" not in image.info:
        # PngImageFile.getexif() would decode every pixel to look for an eXIf chunk after
        # the image data; browsers ignore such late chunks, and so does Loupe.
        return None
    return image.getexif()


def _upright_exif(exif: Image.Exif) -> bytes | None:
    """The EXIF block for pixels already turned upright; None when it can't be written back (it is only metadata).

    A TIFF's first directory is its EXIF as Pillow reads it: the tags that lay out the TIFF's own pixels (and
    its ICC profile, which travels on its own) are dropped, since they would describe the wrong image.
    """
    try:
        if ExifTags.Base.Orientation in exif:
            exif[ExifTags.Base.Orientation] = 1
        for tag in _TIFF_LAYOUT_TAGS:
            exif.pop(tag, None)
        return exif.tobytes()
    except Exception:  # a malformed block Pillow read but can't write
        return None


def _sized_exif(picture: Picture) -> bytes | None:
    """The picture's EXIF with its pixel dimensions, where it states them, made the picture's."""
    if picture.exif is None:
        return None
    try:
        exif = Image.Exif()
        exif.load(picture.exif)
        if _EXIF_IFD in exif:
            details = exif.get_ifd(_EXIF_IFD)
            for tag, value in zip(_PIXEL_SIZE_TAGS, (picture.width, picture.height)):
                if tag in details:
                    details[tag] = value
        return exif.tobytes()
    except Exception:
        return None


def _upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    if orientation not in _ORIENTATIONS:
        return pixels
    transpose, flip_rows, flip_columns = _ORIENTATIONS[orientation]
    if transpose:
        pixels = pixels.swapaxes(0, 1)
    if flip_rows:
        pixels = pixels[::-1]
    if flip_columns:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels)


def _deep_colour_layout(data: bytes, image: Image.Image) -> str | None:
    """"gray" or "color" for 16-bit files that Pillow would read as 8-bit; None otherwise."""
    if image.format == "PNG":
        depth, colour_type = data[24], data[25]  # from IHDR, right after the signature
        if depth == 16 and colour_type != 0:  # 16-bit plain gray is Pillow's I;16
            return "gray" if colour_type == 4 else "color"
    elif isinstance(image, TiffImagePlugin.TiffImageFile):
        bits = image.tag_v2.get(258, (1,))
        if len(bits) > 1 and max(bits) == 16:
            return "gray" if image.tag_v2.get(262) in (0, 1) else "color"
    return None


def _pixels_from_opencv(data: bytes, *, gray: bool, size: tuple[int, int]) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint16 or pixels.shape[1::-1] != size:
        raise _corrupt()
    if pixels.ndim == 2:
        return pixels[..., None]
    # OpenCV orders colour BGR(A) and expands gray+alpha to BGRA.
    order = {2: [0, 1], 3: [2, 1, 0], 4: [0, 3] if gray else [2, 1, 0, 3]}[pixels.shape[2]]
    return np.ascontiguousarray(pixels[..., order])


def _pixels_from_pillow(image: Image.Image, icc: bytes | None) -> tuple[np.ndarray, bytes | None]:
    """Pixels in L, LA, RGB or RGBA (8-bit) or gray 16-bit, and the ICC profile that still applies."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image).astype(np.uint16)[..., None], icc
    if mode == "I":
        return np.clip(np.asarray(image), 0, 65535).astype(np.uint16)[..., None], icc
    if mode == "F":
        raise InvalidInput("32-bit floating-point images are not supported.", "image", code="UNSUPPORTED_IMAGE_FORMAT")
    if mode == "CMYK":
        return _cmyk_to_rgb(image, icc), None
    if mode in ("P", "PA"):
        alpha = mode == "PA" or image.has_transparency_data
        pixels = np.asarray(image.convert("RGBA" if alpha else "RGB"))
        if _palette_is_gray(image):
            pixels = np.ascontiguousarray(pixels[..., [0, 3] if alpha else [0]])
        return pixels, icc
    keyed = "transparency" in image.info  # an 8-bit gray or RGB PNG's tRNS colour: the pixels of it are transparent
    if mode in ("1", "L"):
        target = "LA" if keyed else "L"
    elif mode in ("LA", "La"):
        target = "LA"
    elif mode in ("RGBA", "RGBa"):
        target = "RGBA"
    else:  # RGB, RGBX, YCbCr, HSV...
        target = "RGBA" if keyed and mode == "RGB" else "RGB"
    converted = image if mode == target else image.convert(target)
    pixels = np.asarray(converted)
    return (pixels[..., None] if pixels.ndim == 2 else pixels), icc


def _palette_is_gray(image: Image.Image) -> bool:
    palette = np.array(image.getpalette() or [], np.uint8).reshape(-1, 3)
    return bool((palette == palette[:, :1]).all())


def _cmyk_to_rgb(image: Image.Image, icc: bytes | None) -> np.ndarray:
    if icc is not None and icc[16:20] == b"CMYK":
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return np.asarray(ImageCms.profileToProfile(image, source, srgb, outputMode="RGB"))
        except (ImageCms.PyCMSError, OSError):  # ImageCmsProfile raises OSError for a profile it can't parse
            pass  # a broken profile: fall back to Pillow's naive conversion
    return np.asarray(image.convert("RGB"))


def _icc_fits(icc: bytes, channels: int) -> bool:
    """Whether a profile's colour space (ICC header bytes 16-20) describes pixels with `channels`."""
    return len(icc) >= 128 and icc[16:20] == _ICC_SPACES[channels]


# --------------------------------------------------------------------------- encoding


def _to_8bit(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    out = np.empty(pixels.shape, np.uint8)
    row_items = pixels.shape[1] * pixels.shape[2]
    for rows in row_blocks(pixels.shape[0], row_items):
        out[rows] = (pixels[rows].astype(np.uint32) * 255 + 32767) // 65535
    return out


def _storable(pixels: np.ndarray, fmt: OutputFormat) -> np.ndarray:
    """8-bit pixels in a layout `fmt` holds: jpeg has no alpha, webp no gray, avif no gray+alpha."""
    channels = pixels.shape[2]
    if fmt == "jpeg" and channels in (2, 4):
        return _flatten_on_white(pixels)
    if (fmt == "webp" and channels <= 2) or (fmt == "avif" and channels == 2):
        return _gray_to_colour(pixels)
    return pixels


def _flatten_on_white(pixels: np.ndarray) -> np.ndarray:
    """8-bit L/RGB of an 8-bit LA/RGBA picture composited over white."""
    height, width, channels = pixels.shape
    out = np.empty((height, width, channels - 1), np.uint8)
    for rows in row_blocks(height, width * channels):
        colour = pixels[rows, :, :-1].astype(np.float32)
        transparency = (255 - pixels[rows, :, -1:].astype(np.float32)) / 255
        out[rows] = np.rint(colour + (255 - colour) * transparency)
    return out


def _gray_to_colour(pixels: np.ndarray) -> np.ndarray:
    """L -> RGB, LA -> RGBA."""
    gray = pixels[..., :1]
    parts = [gray, gray, gray] + ([pixels[..., 1:]] if pixels.shape[2] == 2 else [])
    return np.concatenate(parts, axis=2)


def _gif_image(pixels: np.ndarray) -> Image.Image:
    """A palette image; alpha becomes GIF's one transparent index (transparent below half)."""
    if pixels.shape[2] == 1:
        return Image.fromarray(pixels[..., 0])
    has_alpha = pixels.shape[2] in (2, 4)
    colour = pixels[..., :-1] if has_alpha else pixels
    if colour.shape[2] == 1:
        colour = _gray_to_colour(colour)
    # Fast octree is 10× quicker than median cut here, for a slightly coarser palette.
    image = Image.fromarray(np.ascontiguousarray(colour))
    image = image.quantize(255 if has_alpha else 256, method=Image.Quantize.FASTOCTREE)
    if not has_alpha:
        return image
    indices = np.array(image)
    indices[pixels[..., -1] < 128] = 255
    paletted = Image.fromarray(indices)
    paletted.putpalette(image.getpalette() or [])  # turns the L image into P
    paletted.info["transparency"] = 255
    return paletted


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}
_ZLIB_HEADER = b"\x78\x9c"  # deflate with a 32 KiB window; the level bits in it are informational


def _encode_png(pixels: np.ndarray, level: int, icc: bytes | None, exif: bytes | None) -> bytes:
    """A PNG whose zlib stream is deflated in parallel row bands, each band its own IDAT chunk.

    Every band is compressed on its own and ends with a sync flush, so the bands join into
    one valid deflate stream; their Adler-32 checksums combine into the stream's.
    """
    height, width, channels = pixels.shape
    depth = pixels.dtype.itemsize * 8
    header = struct.pack(">IIBBBBB", width, height, depth, _PNG_COLOUR_TYPES[channels], 0, 0, 0)
    chunks = [_PNG_SIGNATURE, _png_chunk(b"IHDR", header)]
    if icc is not None and _icc_fits(icc, channels):
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib_ng.compress(icc)))
    if exif is not None:  # before the image data, where readers look for it
        chunks.append(_png_chunk(b"eXIf", exif.removeprefix(_EXIF_PREFIX)))
    bands = list(row_blocks(height, width * channels * pixels.dtype.itemsize))
    last = bands[-1]
    deflated = _parallel_map(lambda rows: _deflate_band(pixels, rows, level, rows is last), bands)
    checksum = 1
    chunks.append(_png_chunk(b"IDAT", _ZLIB_HEADER))
    for chunk, band_checksum, band_length in deflated:
        chunks.append(chunk)
        checksum = _adler32_concat(checksum, band_checksum, band_length)
    chunks.append(_png_chunk(b"IDAT", struct.pack(">I", checksum)))
    chunks.append(_png_chunk(b"IEND", b""))
    return b"".join(chunks)


def _deflate_band(pixels: np.ndarray, rows: slice, level: int, last: bool) -> tuple[bytes, int, int]:
    """One band's IDAT chunk, and the Adler-32 and length of its filtered bytes."""
    band = _png_rows(pixels[rows])
    above = _png_rows(pixels[rows.start - 1 : rows.start]) if rows.start else np.zeros_like(band[:1])
    filtered = np.empty((band.shape[0], band.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # PNG filter "Up": each byte minus the byte above it, modulo 256
    np.subtract(band[:1], above, out=filtered[:1, 1:])
    np.subtract(band[1:], band[:-1], out=filtered[1:, 1:])
    compressor = zlib_ng.compressobj(level, zlib_ng.DEFLATED, -zlib_ng.MAX_WBITS)
    raw = filtered.data
    data = compressor.compress(raw) + compressor.flush(zlib_ng.Z_FINISH if last else zlib_ng.Z_SYNC_FLUSH)
    return _png_chunk(b"IDAT", data), zlib_ng.adler32(raw), raw.nbytes


def _png_rows(pixels: np.ndarray) -> np.ndarray:
    """Rows as PNG stores them: one line of bytes per row, 16-bit samples big-endian."""
    if pixels.dtype == np.uint16:
        pixels = pixels.astype(">u2")
    return np.ascontiguousarray(pixels).view(np.uint8).reshape(pixels.shape[0], -1)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib_ng.crc32(kind + payload))


def _adler32_concat(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of two byte strings joined, from each one's checksum and the second's length."""
    modulus = 65521
    low_first, high_first = first & 0xFFFF, first >> 16
    low = (low_first + (second & 0xFFFF) - 1) % modulus
    high = (high_first + (second >> 16) + second_length * (low_first - 1)) % modulus
    return (high << 16) | low


# --------------------------------------------------------------------------- resampling


def _pillow_image(pixels: np.ndarray) -> Image.Image:
    """An H×W×1 (8 or 16-bit) or H×W×3 (8-bit) array as a Pillow image (L, I;16 or RGB)."""
    return Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels))


def _resample_band(source: Image.Image, width: int, height: int, rows: slice) -> Image.Image:
    """Output rows `rows` of `source` resized to width×height, from only the source rows they need."""
    source_width, source_height = source.size
    step = source_height / height
    top, bottom = rows.start * step, rows.stop * step
    margin = 3 * max(1.0, step) + 2  # Lanczos reaches 3 source rows, 3·step when shrinking
    crop_top = max(0, math.floor(top - margin))
    crop_bottom = min(source_height, math.ceil(bottom + margin))
    crop = source.crop((0, crop_top, source_width, crop_bottom))
    box = (0.0, top - crop_top, float(source_width), bottom - crop_top)
    return crop.resize((width, rows.stop - rows.start), Image.Resampling.LANCZOS, box=box)


_T = TypeVar("_T")
_R = TypeVar("_R")


def _parallel_map(function: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """`function` over `items` on every core, in order (zlib, numpy and Pillow release the GIL)."""
    if len(items) <= 1 or _WORKERS == 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(_WORKERS, len(items))) as pool:
        return list(pool.map(function, items))
