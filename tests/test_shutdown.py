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
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
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
        time.sleep(0.5)
        refused = httpx.get(f"{url}/v1/models", timeout=10)
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
