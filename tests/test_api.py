"""The OpenAI-compatible API, driven by the official openai SDK against a live Loupe on 127.0.0.1."""
from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import spandrel
import torch
from PIL import Image
from skimage import data as skdata

from server.engine.weights import find_weights
from tests.conftest import loupe_settings
from tests.servers import serve


def photo(width: int, height: int) -> Image.Image:
    return Image.fromarray(skdata.coffee()).resize((width, height), Image.Resampling.LANCZOS)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def interior(pixels: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    dy, dx = int(pixels.shape[0] * fraction), int(pixels.shape[1] * fraction)
    return pixels[dy : pixels.shape[0] - dy, dx : pixels.shape[1] - dx]


def reference_upscale(weights_dir: Path, weight_id: str, image: Image.Image) -> np.ndarray:
    """The model's own output: one full-frame fp32 forward pass through spandrel, nothing of Loupe's."""
    path = find_weights(weight_id, weights_dir)
    model = spandrel.ModelLoader().load_from_file(str(path)).eval()
    tensor = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        output = model(tensor)
    return (output[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def client(loupe_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{loupe_url}/v1", api_key="test", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def source_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "coffee.png"
    photo(96, 64).save(path)
    return path


def fetch(url: str) -> tuple[bytes, str]:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    return response.content, response.headers["content-type"]


def test_sdk_url_result_is_the_models_output(client: openai.OpenAI, source_png: Path, weights_dir: Path) -> None:
    with source_png.open("rb") as image:
        result = client.images.edit(model="realesr-animevideov3", image=image, prompt="ignored",
                                    extra_body={"scale_factor": 4})
    assert result.size == "384x256"
    body, content_type = fetch(result.data[0].url)
    assert content_type == "image/png"
    got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    expected = reference_upscale(weights_dir, "realesr-animevideov3-x4", Image.open(source_png))
    assert got.shape == expected.shape == (256, 384, 3)
    assert psnr(interior(got), interior(expected)) >= 40
    metadata = result.model_extra["metadata"]
    assert metadata["provider"] == "local" and metadata["cost"] == 0
    assert metadata["model"] == "realesr-animevideov3"
    assert metadata["executed_model"] == "local/realesr-animevideov3-x4"


def test_sdk_b64_fractional_scale_jpeg(client: openai.OpenAI, source_png: Path, weights_dir: Path) -> None:
    with source_png.open("rb") as image:
        result = client.images.edit(model="real-esrgan", image=image, prompt="", response_format="b64_json",
                                    output_format="jpeg", extra_body={"scale_factor": 1.5})
    assert result.size == "144x96"
    assert result.data[0].url is None
    decoded = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert decoded.format == "JPEG" and decoded.size == (144, 96)
    native = reference_upscale(weights_dir, "realesrgan-x4plus", Image.open(source_png))
    expected = np.asarray(Image.fromarray(native).resize((144, 96), Image.Resampling.LANCZOS))
    assert psnr(interior(np.asarray(decoded.convert("RGB"))), interior(expected)) >= 30
    assert result.model_extra["metadata"]["executed_model"] == "local/realesrgan-x4plus"


def test_scale_between_native_scales_uses_the_closest_variant(client: openai.OpenAI, source_png: Path) -> None:
    with source_png.open("rb") as image:
        result = client.images.edit(model="realesr-animevideov3", image=image, prompt="",
                                    extra_body={"scale_factor": 2.5, "n": 2})
    assert result.size == "240x160"
    assert len(result.data) == 2
    assert result.model_extra["metadata"]["executed_model"] == "local/realesr-animevideov3-x3"
    for item in result.data:
        assert Image.open(io.BytesIO(fetch(item.url)[0])).size == (240, 160)


def test_size_field_sets_the_exact_output(loupe_url: str, source_png: Path) -> None:
    response = httpx.post(f"{loupe_url}/v1/images/edits", data={"model": "realesr-animevideov3", "size": "192x128"},
                          files={"image": source_png.read_bytes()}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "192x128"


def test_image_as_data_uri(loupe_url: str, source_png: Path) -> None:
    uri = "data:image/png;base64," + base64.b64encode(source_png.read_bytes()).decode()
    response = httpx.post(f"{loupe_url}/v1/images/edits",
                          data={"model": "realesr-animevideov3", "scale_factor": "2", "output_format": "webp"},
                          files={"image": (None, uri)}, timeout=120)
    assert response.status_code == 200, response.text
    body, content_type = fetch(response.json()["data"][0]["url"])
    assert content_type == "image/webp"
    assert Image.open(io.BytesIO(body)).size == (192, 128)


def test_dry_run_plans_without_running(loupe_url: str, source_png: Path) -> None:
    response = httpx.post(f"{loupe_url}/v1/images/edits?dryRun=true",
                          data={"model": "realesrgan-x4plus", "scale_factor": "2"},
                          files={"image": source_png.read_bytes()}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["estimated"] is True and body["provider"] == "local"
    assert body["total_cost_micros"] == 0 and body["currency"] == "USD"
    assert body["components"][0]["type"] == "output"
    assert body["size"] == "192x128"
    assert body["executed_model"] == "local/realesrgan-x4plus"
    assert body["plan"]


def test_models_lists_local_and_remote_ids(client: openai.OpenAI) -> None:
    cards = {model.id: model for model in client.models.list()}
    for model_id in ("realesrgan-x4plus", "realesrgan-x4plus-anime", "realesr-animevideov3", "aura-sr",
                     "topaz-image-upscale", "crystal-upscaler", "clarity-upscaler", "flux-vision-upscaler",
                     "seedvr-image-upscale", "recraft-crisp-upscale", "recraft-creative-upscale", "google-upscaler"):
        assert model_id in cards
    assert cards["realesrgan-x4plus"].model_extra["runnable"] is True
    assert cards["realesrgan-x4plus"].model_extra["where"] == "local"
    assert cards["topaz-image-upscale"].model_extra["runnable"] is False  # no provider configured here


def test_every_response_carries_a_request_id(loupe_url: str) -> None:
    for response in (httpx.get(f"{loupe_url}/v1/models"), httpx.get(f"{loupe_url}/nope"),
                     httpx.post(f"{loupe_url}/v1/images/edits", data={"model": "x"})):
        assert response.headers["x-request-id"]
    mine = httpx.get(f"{loupe_url}/v1/models", headers={"X-Request-Id": "client-chosen-id-1"})
    assert mine.headers["x-request-id"] == "client-chosen-id-1"


def test_results_expire(weights_dir: Path, tmp_path: Path, source_png: Path) -> None:
    from server.app import create_app

    ttl_s = 3600
    settings = loupe_settings(weights_dir, tmp_path, result_ttl_s=ttl_s)
    with serve(create_app(settings)) as url:
        response = httpx.post(f"{url}/v1/images/edits", data={"model": "realesr-animevideov3", "scale_factor": "2"},
                              files={"image": source_png.read_bytes()}, timeout=120)
        result_url = response.json()["data"][0]["url"]
        assert httpx.get(result_url, timeout=60).status_code == 200
        # A result expires by its file's mtime: age it past the TTL instead of waiting the TTL out.
        stored = tmp_path / "results" / result_url.rsplit("/", 1)[1]
        assert stored.is_file()
        past = time.time() - ttl_s - 1
        os.utime(stored, (past, past))
        expired = httpx.get(result_url, timeout=60)
        assert expired.status_code == 404
        assert expired.json()["error"]["code"] == "RESULT_NOT_FOUND"


def test_public_url_builds_result_urls(weights_dir: Path, tmp_path: Path, source_png: Path) -> None:
    from server.app import create_app

    settings = loupe_settings(weights_dir, tmp_path, public_url="https://upscale.example.test/base/")
    with serve(create_app(settings)) as url:
        response = httpx.post(f"{url}/v1/images/edits", data={"model": "realesr-animevideov3", "scale_factor": "2"},
                              files={"image": source_png.read_bytes()}, timeout=120)
    assert response.json()["data"][0]["url"].startswith("https://upscale.example.test/base/results/")


def test_api_keys_guard_every_v1_route(weights_dir: Path, tmp_path: Path, source_png: Path) -> None:
    from server.app import create_app

    settings = loupe_settings(weights_dir, tmp_path, api_keys=["key-one-0123456789", "key-two-0123456789"])
    with serve(create_app(settings)) as url:
        anonymous = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            anonymous.models.list()
        assert refused.value.response.json()["error"]["code"] == "AUTHENTICATION_FAILED"
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert httpx.post(f"{url}/v1/images/edits", data={"model": "real-esrgan"}).status_code == 401
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="key-two-0123456789", max_retries=0)
        assert any(model.id == "real-esrgan" or model.id == "realesrgan-x4plus" for model in keyed.models.list())
        assert httpx.get(f"{url}/healthz").status_code == 200
