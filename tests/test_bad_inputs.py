"""Every bad request gets a clear 4xx in OpenAI's error shape, and the server keeps serving good ones."""
from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import loupe_settings
from tests.servers import serve

MAX_UPLOAD = 2 * 1024 * 1024


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header that claims a huge image; no pixel data worth decoding."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


GOOD = _png(32, 24)

# (name, form fields, files, expected status, expected param)
CASES: list[tuple[str, dict[str, str], dict[str, Any], int, str | None]] = [
    ("missing model", {}, {"image": ("a.png", GOOD)}, 400, "model"),
    ("missing image", {"model": "realesr-animevideov3"}, {}, 400, "image"),
    ("unknown model", {"model": "no-such-model"}, {"image": ("a.png", GOOD)}, 404, "model"),
    ("empty file", {"model": "realesr-animevideov3"}, {"image": ("a.png", b"")}, 400, "image"),
    ("truncated png", {"model": "realesr-animevideov3"}, {"image": ("a.png", GOOD[: len(GOOD) // 2])}, 400, "image"),
    ("text named .png", {"model": "realesr-animevideov3"}, {"image": ("a.png", b"just some text, not a picture")}, 400,
     "image"),
    ("decompression bomb header", {"model": "realesr-animevideov3"}, {"image": ("a.png", _bomb_png(100_000, 100_000))},
     400, "image"),
    ("scale zero", {"model": "realesr-animevideov3", "scale_factor": "0"}, {"image": ("a.png", GOOD)}, 400,
     "scale_factor"),
    ("negative scale", {"model": "realesr-animevideov3", "scale_factor": "-2"}, {"image": ("a.png", GOOD)}, 400,
     "scale_factor"),
    ("NaN scale", {"model": "realesr-animevideov3", "scale_factor": "NaN"}, {"image": ("a.png", GOOD)}, 400,
     "scale_factor"),
    ("infinite scale", {"model": "realesr-animevideov3", "scale_factor": "inf"}, {"image": ("a.png", GOOD)}, 400,
     "scale_factor"),
    ("scale not a number", {"model": "realesr-animevideov3", "scale_factor": "big"}, {"image": ("a.png", GOOD)}, 400,
     "scale_factor"),
    ("output over the side limit", {"model": "realesr-animevideov3", "scale_factor": "500"},
     {"image": ("a.png", GOOD)}, 400, "scale_factor"),
    ("unknown output_format", {"model": "realesr-animevideov3", "output_format": "bmp"}, {"image": ("a.png", GOOD)},
     400, "output_format"),
    ("unknown response_format", {"model": "realesr-animevideov3", "response_format": "xml"},
     {"image": ("a.png", GOOD)}, 400, "response_format"),
    ("n zero", {"model": "realesr-animevideov3", "n": "0"}, {"image": ("a.png", GOOD)}, 400, "n"),
    ("n eleven", {"model": "realesr-animevideov3", "n": "11"}, {"image": ("a.png", GOOD)}, 400, "n"),
    ("compression over 100", {"model": "realesr-animevideov3", "output_compression": "101"},
     {"image": ("a.png", GOOD)}, 400, "output_compression"),
    ("size not WxH", {"model": "realesr-animevideov3", "size": "large"}, {"image": ("a.png", GOOD)}, 400, "size"),
    ("size with another aspect ratio", {"model": "realesr-animevideov3", "size": "128x128"},
     {"image": ("a.png", GOOD)}, 400, "size"),
    ("size and scale together", {"model": "realesr-animevideov3", "size": "64x48", "scale_factor": "3"},
     {"image": ("a.png", GOOD)}, 400, "size"),
    ("scale the model refuses", {"model": "google-upscaler", "scale_factor": "3"}, {"image": ("a.png", GOOD)}, 400,
     "scale_factor"),
    ("two images", {"model": "realesr-animevideov3"}, {"image": ("a.png", GOOD), "image[]": ("b.png", GOOD)}, 400,
     "image"),
    ("a mask file", {"model": "realesr-animevideov3"}, {"image": ("a.png", GOOD), "mask": ("m.png", GOOD)}, 400, "mask"),
    ("loopback image URL", {"model": "realesr-animevideov3", "image": "http://127.0.0.1:9/a.png"}, {}, 400, "image"),
    ("metadata-service image URL", {"model": "realesr-animevideov3", "image": "http://169.254.169.254/latest/meta-data"},
     {}, 400, "image"),
    ("private-range image URL", {"model": "realesr-animevideov3", "image": "http://10.0.0.7/a.png"}, {}, 400, "image"),
    ("file URL", {"model": "realesr-animevideov3", "image": "file:///etc/passwd"}, {}, 400, "image"),
    ("ftp URL", {"model": "realesr-animevideov3", "image": "ftp://example.com/a.png"}, {}, 400, "image"),
    ("broken data URI", {"model": "realesr-animevideov3", "image": "data:image/png;base64,@@@@"}, {}, 400, "image"),
    ("upload just over the cap", {"model": "realesr-animevideov3"}, {"image": ("a.png", b"\0" * (MAX_UPLOAD + 1000))},
     413, "image"),
    ("upload far over the cap", {"model": "realesr-animevideov3"}, {"image": ("a.png", b"\0" * (MAX_UPLOAD + (4 << 20)))},
     413, "image"),
    ("remote model without a provider", {"model": "topaz-image-upscale", "scale_factor": "2"},
     {"image": ("a.png", GOOD)}, 503, "model"),
]


@pytest.fixture(scope="module")
def url(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from server.app import create_app

    settings = loupe_settings(weights_dir, tmp_path_factory.mktemp("data"), max_upload_bytes=MAX_UPLOAD)
    with serve(create_app(settings)) as base:
        yield base


def _multipart(fields: dict[str, str], files: dict[str, Any]) -> dict[str, Any]:
    parts = {key: (None, value) for key, value in fields.items()}
    parts.update(files)
    return parts


@pytest.mark.parametrize(("name", "fields", "files", "status", "param"), CASES, ids=[case[0] for case in CASES])
def test_bad_request_gets_a_clear_refusal(url: str, name: str, fields: dict[str, str], files: dict[str, Any],
                                          status: int, param: str | None) -> None:
    response = httpx.post(f"{url}/v1/images/edits", files=_multipart(fields, files), timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert len(error["message"]) > 10
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-request-id"]


def test_non_multipart_body_is_refused(url: str) -> None:
    response = httpx.post(f"{url}/v1/images/edits", json={"model": "realesr-animevideov3"})
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"


def test_good_request_still_succeeds_after_the_bad_ones(url: str) -> None:
    for _, fields, files, _, _ in CASES[:8]:
        httpx.post(f"{url}/v1/images/edits", files=_multipart(fields, files), timeout=60)
    response = httpx.post(f"{url}/v1/images/edits",
                          files=_multipart({"model": "realesr-animevideov3", "scale_factor": "2",
                                            "response_format": "b64_json"}, {"image": ("a.png", GOOD)}), timeout=120)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert image.size == (64, 48)


def test_oversized_urls_headers_and_forms_are_refused(url: str) -> None:
    long_url = httpx.get(f"{url}/v1/models?pad=" + "a" * 20_000)
    assert long_url.status_code == 414 and long_url.json()["error"]["code"] == "URI_TOO_LONG"
    big_headers = httpx.get(f"{url}/v1/models", headers={"X-Pad": "a" * 40_000})
    assert big_headers.status_code == 431 and big_headers.json()["error"]["code"] == "HEADERS_TOO_LARGE"
    many_fields = httpx.post(f"{url}/v1/images/edits", data={f"field{i}": "1" for i in range(100)},
                             files={"image": ("a.png", GOOD)})
    assert many_fields.status_code == 400 and "fields" in many_fields.json()["error"]["message"]
