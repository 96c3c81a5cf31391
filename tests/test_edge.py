"""The edge, seen by a client: one request id per response, readiness while draining, any-case data: URIs."""
from __future__ import annotations

import base64
import io
import socket
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


def test_a_tiny_scale_runs_the_model_on_no_more_than_the_output_needs(served: tuple[FastAPI, str]) -> None:
    _, url = served
    gradient = Image.linear_gradient("L").resize((8192, 8192)).convert("RGB")
    buffer = io.BytesIO()
    gradient.save(buffer, format="PNG", compress_level=1)
    fields = {"model": "realesr-animevideov3", "scale_factor": "0.01", "response_format": "b64_json"}
    files = {"image": ("big.png", buffer.getvalue())}
    planned = httpx.post(f"{url}/v1/images/edits?dryRun=true", data=fields, files=files, timeout=120).json()["plan"]
    (step,) = planned["passes"]
    assert planned["input"] == [8192, 8192]
    assert (step["input"], step["output"], step["tiles"]) == ([41, 41], [82, 82], 1)  # resampled down first
    response = httpx.post(f"{url}/v1/images/edits", data=fields, files=files, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "82x82"


def test_a_client_too_slow_to_send_its_request_is_cut_off(weights_dir: Path, tmp_path: Path) -> None:
    from server.app import create_app
    from server.serve import http_protocol

    settings = loupe_settings(weights_dir, tmp_path, read_timeout_s=1)
    with serve(create_app(settings), http=http_protocol(settings)) as url:
        port = int(url.rsplit(":", 1)[1])
        head = b"POST /v1/images/edits HTTP/1.1\r\nHost: loupe\r\n"
        for sent in (head, head + b"Content-Type: text/plain\r\nContent-Length: 100000\r\n\r\n0123456789"):
            with socket.create_connection(("127.0.0.1", port)) as slow:
                slow.sendall(sent)  # and then nothing more, as a client sending a byte now and then
                slow.settimeout(30)
                while slow.recv(4096):  # whatever answer comes, the server then closes the connection
                    pass
        assert httpx.get(f"{url}/healthz").status_code == 200
