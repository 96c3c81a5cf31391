"""SIGTERM: the request in flight finishes, new ones get 503, and the process exits cleanly."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image
from skimage import data as skdata

from tests.servers import free_port


def _png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sigterm_drains_in_flight_work(weights_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "LOUPE_WEIGHTS_DIR": str(weights_dir), "LOUPE_DATA_DIR": str(tmp_path),
           "LOUPE_DEVICE": "cpu", "LOUPE_TILE_SIZE": "32"}
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, "loupe serve exited during start-up"
            try:
                if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("loupe serve did not answer /healthz within 120 s")
        outcome: dict[str, httpx.Response] = {}

        def slow_request() -> None:
            outcome["response"] = httpx.post(
                f"{url}/v1/images/edits", data={"model": "realesrgan-x4plus", "scale_factor": "2"},
                files={"image": ("a.png", _png(96))}, headers={"X-Request-Id": "drain-test-0001"}, timeout=300)

        worker = threading.Thread(target=slow_request)
        worker.start()
        with httpx.stream("GET", f"{url}/v1/progress/drain-test-0001", timeout=120) as events:
            for line in events.iter_lines():
                if '"queued"' in line or '"running"' in line:  # the request is in the server's hands
                    break
        server.send_signal(signal.SIGTERM)
        # Until the signal is handled the server still answers; from then on it refuses new work.
        deadline = time.monotonic() + 60
        while (refused := httpx.get(f"{url}/v1/models", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline, "the server never began to drain"
            time.sleep(0.05)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "SHUTTING_DOWN"
        worker.join(timeout=300)
        assert outcome["response"].status_code == 200, outcome["response"].text
        assert outcome["response"].json()["size"] == "192x192"
        # uvicorn re-raises the signal once it has shut down, as a service manager expects.
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
