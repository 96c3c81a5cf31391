"""The edge, seen by a client: one request id per response, readiness while draining, any-case data: URIs."""
from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from tests import photos
from tests.conftest import loupe_settings
from tests.servers import serve


@pytest.fixture(scope="module")
def served(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, str]]:
    from server.app import create_app

    app = create_app(loupe_settings(weights_dir, tmp_path_factory.mktemp("data")))
    with serve(app) as url:
        yield app, url


def png_data_uri(scheme: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(photos.coffee((24, 16))).save(buffer, format="PNG")
    return f"{scheme}:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def test_an_error_response_carries_one_request_id(served: tuple[FastAPI, str]) -> None:
    _, url = served
    response = httpx.post(f"{url}/v1/images/edits", data={"model": "no-such-model"}, files={"image": b"x"},
                          headers={"X-Request-Id": "client-chosen-1"}, timeout=30)
    assert response.status_code == 404
    assert response.headers.get_list("x-request-id") == ["client-chosen-1"]


@pytest.mark.parametrize("scheme", ["data", "DATA", "Data"])
def test_a_data_uri_is_accepted_whatever_the_case_of_its_scheme(served: tuple[FastAPI, str], scheme: str) -> None:
    _, url = served
    response = httpx.post(f"{url}/v1/images/edits", timeout=60, data={
        "model": "realesr-animevideov3", "scale_factor": "2", "response_format": "b64_json",
        "image": png_data_uri(scheme)})
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "48x32"


def test_readyz_answers_503_while_draining(served: tuple[FastAPI, str]) -> None:
    app, url = served
    assert httpx.get(f"{url}/readyz").status_code == 200
    app.state.admission.draining = True
    try:
        response = httpx.get(f"{url}/readyz")
        assert (response.status_code, response.json()["status"]) == (503, "draining")
        assert httpx.get(f"{url}/healthz").status_code == 200  # alive, only not taking work
    finally:
        app.state.admission.draining = False


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_an_8_bit_png_with_a_transparent_colour_keeps_its_transparency(served: tuple[FastAPI, str],
                                                                       mode: str) -> None:
    _, url = served
    pixels = photos.coffee((32, 24)).copy() if mode == "RGB" else photos.coffee((32, 24))[..., 0].copy()
    key = (1, 2, 3) if mode == "RGB" else 1
    pixels[:12] = key  # the top half is the tRNS colour: fully transparent
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", transparency=key)
    response = httpx.post(f"{url}/v1/images/edits", data={"model": "realesr-animevideov3", "scale_factor": "2",
                                                          "response_format": "b64_json"},
                          files={"image": buffer.getvalue()}, timeout=60)
    assert response.status_code == 200, response.text
    result = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert result.mode == ("RGBA" if mode == "RGB" else "LA")
    alpha = np.asarray(result)[..., -1]
    assert alpha[:20].max() <= 8 and alpha[28:].min() >= 220  # transparent on top, opaque below, edges resampled


def test_a_cmyk_jpeg_with_a_broken_icc_profile_is_converted_plainly(served: tuple[FastAPI, str]) -> None:
    _, url = served
    cmyk = Image.fromarray(photos.coffee((32, 24))).convert("CMYK")
    broken = b"\x00" * 16 + b"CMYK" + b"\x00" * 108  # a CMYK header with nothing valid behind it
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG", icc_profile=broken)
    response = httpx.post(f"{url}/v1/images/edits", data={"model": "realesr-animevideov3", "scale_factor": "2"},
                          files={"image": buffer.getvalue()}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "64x48"
