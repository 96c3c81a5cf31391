"""Per-key rate limits, and the operator's view: /metrics and /readyz."""
from __future__ import annotations

import io
from pathlib import Path

import httpx
from PIL import Image

from tests.conftest import loupe_settings
from tests.servers import serve


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (90, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789ab"


def test_rate_limit_applies_per_api_key(weights_dir: Path, tmp_path: Path) -> None:
    from server.app import create_app

    # One request per 1000 s: a key's bucket cannot refill during the test, however slow the machine.
    settings = loupe_settings(weights_dir, tmp_path, api_keys=[ALICE, BOB], rate_limit=0.001)
    with serve(create_app(settings)) as url:
        alice = {"Authorization": f"Bearer {ALICE}"}
        statuses = [httpx.get(f"{url}/v1/models", headers=alice).status_code for _ in range(3)]
        assert statuses == [200, 429, 429]
        limited = httpx.get(f"{url}/v1/models", headers=alice)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "RATE_LIMITED"
        assert 1 <= int(limited.headers["retry-after"]) <= 1000
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {BOB}"}).status_code == 200


def test_metrics_count_requests_by_model_provider_and_status(weights_dir: Path, tmp_path: Path) -> None:
    from server.app import create_app

    with serve(create_app(loupe_settings(weights_dir, tmp_path))) as url:
        ok = httpx.post(f"{url}/v1/images/edits", data={"model": "real-esrgan", "scale_factor": "1"},
                        files={"image": ("a.png", _png())}, timeout=120)
        assert ok.status_code == 200, ok.text
        httpx.post(f"{url}/v1/images/edits", data={"model": "realesrgan-x4plus", "scale_factor": "5000"},
                   files={"image": ("a.png", _png())})
        text = httpx.get(f"{url}/metrics").text
    assert 'loupe_requests_total{model="realesrgan-x4plus",provider="local",status="200"} 1.0' in text
    assert 'loupe_requests_total{model="realesrgan-x4plus",provider="-",status="400"} 1.0' in text
    assert "loupe_request_duration_seconds_bucket" in text
    assert "loupe_queue_depth" in text and "loupe_tiles_processed_total" in text
