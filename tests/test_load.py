"""Under load the server answers every request with an image or a 429, and stays up.

Admission is by estimated seconds of work (LOUPE_MAX_QUEUE_S), not by a count of jobs: many small jobs are
all taken, and a backlog past the budget is refused with a Retry-After that, waited out, gets a request in.
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

from scripts.loadrun import _png, run_load
from tests.conftest import loupe_settings
from tests.servers import serve


def test_24_clients_sending_48_small_images_all_get_their_image(weights_dir: Path, tmp_path: Path) -> None:
    from server.app import create_app

    with serve(create_app(loupe_settings(weights_dir, tmp_path))) as url:
        report = asyncio.run(run_load(url, clients=24, requests=48, kinds=("good",), size=(64, 48)))
    assert report.sent == 48
    assert dict(report.statuses) == {200: 48}, report.statuses
    assert report.outcomes["served"] == 48  # every 200 carried a valid image of the right size
    assert report.lost == 0


class PausableClock:
    """`time` for server.engine.devices: the real monotonic clock until `frozen`, plus `offset`."""

    def __init__(self) -> None:
        self.frozen: float | None = None
        self.offset = 0.0

    def monotonic(self) -> float:
        return (self.frozen if self.frozen is not None else time.monotonic()) + self.offset


def test_a_backlog_past_the_budget_gets_a_429_whose_retry_after_gets_the_request_in(
        weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.app import create_app
    from server.engine import devices

    clock = PausableClock()
    monkeypatch.setattr(devices, "time", clock)

    def post(url: str, model: str, width: int, height: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/images/edits", timeout=540, data={"model": model, "scale_factor": "4"},
                          files={"image": ("a.png", _png(width, height, 0))})

    with serve(create_app(loupe_settings(weights_dir, tmp_path, max_queue_s=1))) as url:
        assert post(url, "realesrgan-x4plus", 16, 16).status_code == 200  # loads the model; the engine calibrates
        # From here the device's clock stands still: the big job's backlog does not decay, however long it runs.
        clock.frozen = time.monotonic()
        big = threading.Thread(target=post, args=(url, "realesrgan-x4plus", 256, 192))
        big.start()
        try:
            deadline = time.monotonic() + 120
            while "loupe_queue_seconds 0.0" in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            refused = post(url, "realesr-animevideov3", 64, 48)
            assert (refused.status_code, refused.json()["error"]["code"]) == (429, "RATE_LIMITED")
            wait = int(refused.headers["retry-after"])
            assert 1 <= wait <= 60
            assert refused.headers["x-should-retry"] == "true"  # the SDK retries it, after Retry-After
            clock.offset += wait  # Retry-After waited out, on the device's clock: exactly, and at once
            taken = post(url, "realesr-animevideov3", 64, 48)
        finally:
            big.join(540)
    assert taken.status_code == 200, taken.text
    assert taken.json()["size"] == "256x192"


def test_mixed_good_bad_and_cancelled_requests_lose_nothing(weights_dir: Path, tmp_path: Path) -> None:
    from server.app import create_app

    with serve(create_app(loupe_settings(weights_dir, tmp_path, max_queue_s=0.5))) as url:
        report = asyncio.run(run_load(url, clients=12, requests=36, seed=3))
        assert report.lost == 0
        assert report.server_errors == 0
        assert report.outcomes["served"] > 0 and report.outcomes["refused"] > 0
        follow_up = asyncio.run(run_load(url, clients=1, requests=2, kinds=("good",)))
        assert follow_up.outcomes["served"] == 2
        assert httpx.get(f"{url}/healthz").status_code == 200
