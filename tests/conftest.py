"""Shared fixtures: the real converted weights, and a Loupe server on 127.0.0.1."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from server.config import PROJECT_ROOT, Settings
from tests.fake_upstreams import FakeFal, FakeGateway
from tests.servers import serve

WEIGHTS_DIR = PROJECT_ROOT / "weights"
REAL_WEIGHTS = ("realesrgan-x4plus", "realesrgan-x4plus-anime", "realesr-animevideov3-x2", "realesr-animevideov3-x3", "realesr-animevideov3-x4")

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """The real Real-ESRGAN weights (`make test` prepares them); a clear failure when they are missing."""
    from server.engine.weights import find_weights

    missing = [w for w in REAL_WEIGHTS if find_weights(w, WEIGHTS_DIR) is None]
    if missing:
        pytest.fail(f"weights missing from {WEIGHTS_DIR}: {missing}; run `loupe weights ensure` (make test does)")
    return WEIGHTS_DIR


def loupe_settings(weights_dir: Path, data_dir: Path, **overrides: object) -> Settings:
    """Settings for a test server: CPU, small queue, no environment leaking in."""
    base: dict[str, object] = {
        "weights_dir": weights_dir,
        "data_dir": data_dir,
        "device": "cpu",
        "compile": False,
        "allow_private_urls": False,
        "api_keys": [],
        "fal_key": None,
        "gateway_url": None,
    }
    base.update(overrides)
    return Settings.model_validate(base)


@pytest.fixture(scope="module")
def served_fal() -> Iterator[FakeFal]:
    """A fake fal queue server and its signed-upload host on 127.0.0.1, shared by a test module."""
    fake = FakeFal()
    with serve(fake.app) as url, serve(fake.storage.app) as storage_url:
        fake.url, fake.storage.url = url, storage_url
        yield fake


@pytest.fixture
def fal(served_fal: FakeFal) -> FakeFal:
    served_fal.reset()
    return served_fal


@pytest.fixture(scope="module")
def served_gateway() -> Iterator[FakeGateway]:
    """A fake OpenAI-compatible gateway on 127.0.0.1, shared by a test module."""
    fake = FakeGateway()
    with serve(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture
def gateway(served_gateway: FakeGateway) -> FakeGateway:
    served_gateway.reset()
    return served_gateway


@pytest.fixture(scope="module")
def loupe_url(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Loupe server with the real weights, shared by a test module."""
    from server.app import create_app

    settings = loupe_settings(weights_dir, tmp_path_factory.mktemp("loupe-data"))
    with serve(create_app(settings)) as url:
        yield url
