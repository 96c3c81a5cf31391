"""Under load the server answers every request with an image or a 429, and stays up."""
from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from scripts.loadrun import run_load
from tests.conftest import loupe_settings
from tests.servers import serve


def test_24_clients_48_requests_get_only_images_or_429(weights_dir: Path, tmp_path: Path) -> None:
    from server.app import create_app

    with serve(create_app(loupe_settings(weights_dir, tmp_path, queue_size=4))) as url:
        report = asyncio.run(run_load(url, clients=24, requests=48, kinds=("good",)))
        assert report.sent == 48
        assert set(report.statuses) <= {200, 429}, report.statuses
        assert report.statuses[200] >= 4
        assert report.outcomes["served"] == report.statuses[200]  # every 200 carried a valid image of the right size
        assert report.lost == 0
        assert httpx.get(f"{url}/healthz").status_code == 200


@pytest.mark.parametrize("seed", [3])
def test_mixed_good_bad_and_cancelled_requests_lose_nothing(weights_dir: Path, tmp_path: Path, seed: int) -> None:
    from server.app import create_app

    with serve(create_app(loupe_settings(weights_dir, tmp_path, queue_size=4))) as url:
        report = asyncio.run(run_load(url, clients=12, requests=36, seed=seed))
        assert report.lost == 0
        assert report.server_errors == 0
        assert report.outcomes["served"] > 0 and report.outcomes["refused"] > 0
        follow_up = asyncio.run(run_load(url, clients=1, requests=2, kinds=("good",)))
        assert follow_up.outcomes["served"] == 2
