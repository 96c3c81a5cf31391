"""LOUPE_FALLBACK through the API: when a model Loupe can run itself goes to its fal twin instead.

`never` keeps local models local; `unavailable` sends them remote when they can't run here (no weights, an
output over LOUPE_MAX_OUTPUT_SIDE); `overload` also when the local queue is full. A fake fal queue on
127.0.0.1 stands in for fal.ai.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.serving import Services
from tests.conftest import loupe_settings
from tests.fake_upstreams import FAL_KEY, FakeFal, pattern
from tests.servers import serve


@pytest.fixture
def fal(served_fal: FakeFal) -> FakeFal:
    served_fal.reset(queued_polls=0, running_polls=0)
    return served_fal


@pytest.fixture
def no_weights(tmp_path: Path) -> Path:
    path = tmp_path / "no-weights"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def picture_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "in.png"
    pattern(32, 24).save(path)
    return path


@contextmanager
def loupe(weights: Path, data: Path, fal: FakeFal, **overrides: Any) -> Iterator[tuple[str, FastAPI]]:
    """Loupe with the fake fal configured."""
    app = create_app(loupe_settings(weights, data, fal_key=FAL_KEY, fal_url=fal.url, **overrides))
    with serve(app) as url:
        yield url, app


def edit(url: str, path: Path, model: str, scale: float, **options: Any) -> Any:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="client-key", max_retries=0, timeout=60)
    with path.open("rb") as image:
        return client.images.with_raw_response.edit(model=model, image=image, prompt="x",
                                                    extra_body={"scale_factor": scale}, **options)


def edit_error(url: str, path: Path, model: str, scale: float) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        edit(url, path, model, scale)
    return caught.value


def provider_of(raw: Any) -> str:
    metadata = raw.http_response.json()["metadata"]
    assert raw.headers["x-loupe-provider"] == metadata["provider"]
    return metadata["provider"]


def cards(url: str) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{url}/v1/models", timeout=10)
    assert response.status_code == 200
    return {card["id"]: card for card in response.json()["data"]}


def test_without_weights_unavailable_sends_a_local_model_to_fal(
    fal: FakeFal, no_weights: Path, tmp_path: Path, picture_path: Path
) -> None:
    with loupe(no_weights, tmp_path, fal, fallback="unavailable") as (url, _):
        raw = edit(url, picture_path, "realesrgan-x4plus", 2)
        planned = edit(url, picture_path, "realesrgan-x4plus", 2, extra_query={"dryRun": "true"}).http_response.json()
        listed = cards(url)

    (submit,) = fal.submits
    assert submit.app_id == "fal-ai/esrgan"
    assert (submit.input["model"], submit.input["scale"]) == ("RealESRGAN_x4plus", 2)
    assert provider_of(raw) == "fal"
    assert raw.http_response.json()["metadata"]["executed_model"] == "fal/fal-ai/esrgan"
    assert raw.parse().size == "64x48"
    assert (planned["provider"], planned["plan"]["route"]) == ("fal", "fal")
    assert "loupe weights pull realesrgan-x4plus" in planned["plan"]["why"]

    esrgan = listed["realesrgan-x4plus"]
    assert (esrgan["where"], esrgan["runnable"], esrgan["remote"]) == ("fal", True, ["fal"])
    assert esrgan["local"]["runnable"] is False
    assert (listed["crystal-upscaler"]["where"], listed["google-upscaler"]["where"]) == ("fal", None)


def test_without_weights_never_is_a_clear_503_and_fal_is_not_called(
    fal: FakeFal, no_weights: Path, tmp_path: Path, picture_path: Path
) -> None:
    with loupe(no_weights, tmp_path, fal, fallback="never") as (url, _):
        error = edit_error(url, picture_path, "realesrgan-x4plus", 2)
        remote_only = edit(url, picture_path, "crystal-upscaler", 2)
        listed = cards(url)

    assert (error.status_code, error.code, error.param) == (503, "MODEL_UNAVAILABLE", "model")
    assert "loupe weights pull realesrgan-x4plus" in error.body["message"]
    assert error.response.headers["x-should-retry"] == "false"
    # `never` is about models Loupe could run itself; a remote-only model still goes remote.
    assert [submit.app_id for submit in fal.submits] == ["clarityai/crystal-upscaler"]
    assert provider_of(remote_only) == "fal"

    esrgan = listed["realesrgan-x4plus"]
    assert (esrgan["where"], esrgan["runnable"], esrgan["remote"]) == (None, False, [])
    assert (listed["crystal-upscaler"]["where"], listed["crystal-upscaler"]["runnable"]) == ("fal", True)


def test_an_output_over_the_local_limit_goes_to_fal_under_unavailable(
    fal: FakeFal, weights_dir: Path, tmp_path: Path, picture_path: Path
) -> None:
    with loupe(weights_dir, tmp_path, fal, fallback="unavailable", max_output_side=100) as (url, _):
        small = edit(url, picture_path, "realesr-animevideov3", 2)  # 64x48: local
        large = edit(url, picture_path, "realesr-animevideov3", 4)  # 128x96: over 100
        listed = cards(url)

    assert provider_of(small) == "local"
    assert provider_of(large) == "fal"
    assert large.parse().size == "128x96"
    (submit,) = fal.submits
    assert submit.app_id == "fal-ai/esrgan"
    assert (submit.input["scale"], submit.input["model"]) == (4, "RealESRGAN_x4_anime_v3")
    anime = listed["realesr-animevideov3"]
    assert (anime["where"], anime["runnable"], anime["remote"]) == ("local", True, ["fal"])


def test_an_output_over_the_local_limit_is_a_400_under_never(
    fal: FakeFal, weights_dir: Path, tmp_path: Path, picture_path: Path
) -> None:
    with loupe(weights_dir, tmp_path, fal, fallback="never", max_output_side=100) as (url, _):
        error = edit_error(url, picture_path, "realesr-animevideov3", 4)
        listed = cards(url)

    assert (error.status_code, error.code, error.param) == (400, "OUTPUT_TOO_LARGE", "scale_factor")
    assert "LOUPE_MAX_OUTPUT_SIDE" in error.body["message"]
    assert error.response.headers["x-should-retry"] == "false"
    assert fal.submits == []
    anime = listed["realesr-animevideov3"]
    assert (anime["where"], anime["remote"]) == ("local", [])


@contextmanager
def busy_worker(app: FastAPI) -> Iterator[None]:
    """Spend the device's whole queue budget, as a queued job would, without burning CPU."""
    services: Services = app.state.services
    (worker,) = services.engine.workers
    held = worker.reserve(worker.budget_s)
    try:
        yield
    finally:
        held.release()


@pytest.mark.parametrize(("fallback", "status", "provider"), [("overload", 200, "fal"), ("unavailable", 429, None)])
def test_a_full_local_queue_goes_to_fal_only_under_overload(
    fal: FakeFal, weights_dir: Path, tmp_path: Path, picture_path: Path, fallback: str, status: int,
    provider: str | None,
) -> None:
    with loupe(weights_dir, tmp_path, fal, fallback=fallback) as (url, app):
        with busy_worker(app):
            if provider is not None:
                assert provider_of(edit(url, picture_path, "realesr-animevideov3", 2)) == provider
            else:
                error = edit_error(url, picture_path, "realesr-animevideov3", 2)
                assert (error.status_code, error.code) == (status, "RATE_LIMITED")
                assert int(error.response.headers["retry-after"]) >= 1
            listed = cards(url)
        after = edit(url, picture_path, "realesr-animevideov3", 2)

    assert len(fal.submits) == (1 if provider == "fal" else 0)
    assert provider_of(after) == "local"  # once the queue drains, the next request runs here again
    assert listed["realesr-animevideov3"]["where"] == "local"
