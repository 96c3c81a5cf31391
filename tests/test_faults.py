"""Faults stay inside the request they hit: broken weights, a broken result directory."""
from __future__ import annotations

import io
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from server.engine.runtime import LocalEngine
from tests.conftest import loupe_settings
from tests.processes import poll
from tests.servers import serve


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 200, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def _edit(url: str, model: str, **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/edits", data={"model": model, "scale_factor": "2", **fields},
                      files={"image": ("a.png", _png())}, timeout=120)


@pytest.fixture
def broken_weights(weights_dir: Path, tmp_path: Path) -> Path:
    """The animevideov3 weights intact, x4plus replaced by garbage, the anime model missing."""
    directory = tmp_path / "weights"
    directory.mkdir()
    for path in weights_dir.glob("realesr-animevideov3-*"):
        shutil.copy(path, directory / path.name)
    (directory / "realesrgan-x4plus.safetensors").write_bytes(b"not a safetensors file" * 100)
    return directory


@pytest.fixture
def server(broken_weights: Path, tmp_path: Path) -> Iterator[str]:
    from server.app import create_app

    with serve(create_app(loupe_settings(broken_weights, tmp_path / "data"))) as url:
        yield url


def test_corrupt_weights_fail_their_requests_only(server: str) -> None:
    refused = _edit(server, "realesrgan-x4plus")
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "WEIGHTS_CORRUPT"
    assert "realesrgan-x4plus" in error["message"] and "loupe weights" in error["message"]
    assert refused.headers["x-should-retry"] == "false"
    assert _edit(server, "realesr-animevideov3").status_code == 200
    assert _edit(server, "realesrgan-x4plus").status_code == 503  # still a clear answer, not a crash loop


def test_missing_weights_are_named_with_the_command_that_fetches_them(server: str) -> None:
    refused = _edit(server, "realesrgan-x4plus-anime")
    assert refused.status_code == 503
    assert "loupe weights" in refused.json()["error"]["message"]
    cards = {card["id"]: card for card in httpx.get(f"{server}/v1/models").json()["data"]}
    assert cards["realesrgan-x4plus-anime"]["runnable"] is False
    assert cards["realesr-animevideov3"]["runnable"] is True


def test_readiness_follows_the_weights(tmp_path: Path) -> None:
    from server.app import create_app

    empty = tmp_path / "no-weights"
    empty.mkdir()
    with serve(create_app(loupe_settings(empty, tmp_path / "data"))) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        not_ready = httpx.get(f"{url}/readyz")
        assert not_ready.status_code == 503
        assert "realesrgan-x4plus" in not_ready.json()["models"]


def test_unwritable_result_directory_fails_only_url_results(weights_dir: Path, tmp_path: Path) -> None:
    from server.app import create_app

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    blocker = data_dir / "results"
    blocker.write_text("a file where the results directory should be")  # root ignores permissions; this it can't
    with serve(create_app(loupe_settings(weights_dir, data_dir))) as url:
        failed = _edit(url, "realesr-animevideov3")
        assert failed.status_code >= 500
        assert failed.json()["error"]["code"] == "STORAGE_UNAVAILABLE"
        assert str(data_dir) not in failed.text
        assert _edit(url, "realesr-animevideov3", response_format="b64_json").status_code == 200
        blocker.unlink()
        assert _edit(url, "realesr-animevideov3").status_code == 200


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} metric")


class HeldEngine(LocalEngine):
    """The real engine, whose next job, once `armed`, stops at its first report of tiles done and waits there until
    the server cancels it (its client's time limit, its client hanging up): the job is surely mid-run when the
    server acts, however fast or slow the machine."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.armed, self.mid_run = threading.Event(), threading.Event()
        self.first_report: tuple[int, int] | None = None

    async def run(self, job: Any, *, progress: Any = None, cancel: threading.Event | None = None,
                  **options: Any) -> Any:
        hold = self.armed.is_set() and not self.mid_run.is_set()
        assert cancel is not None

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(done, total)
            if hold and done > 0 and not self.mid_run.is_set():
                self.first_report = (done, total)
                self.mid_run.set()
                cancel.wait(300)  # a job the server never cancels goes on to its end, and the test fails

        return await super().run(job, progress=report, cancel=cancel, **options)


def _held_app(settings: Any) -> tuple[Any, HeldEngine]:
    from server.app import create_app

    engine = HeldEngine(settings)
    return create_app(settings, engine_factory=lambda s: engine), engine


LONG_TILES = 625  # 800² in 32-px tiles


def _long_job_parts(url: str) -> httpx.Request:
    """animevideov3 on 800² in 32-px tiles: hundreds of quick tiles, tens of seconds in all on the CPU."""
    buffer = io.BytesIO()
    Image.new("RGB", (800, 800), (10, 200, 90)).save(buffer, format="PNG")
    return httpx.Request("POST", f"{url}/v1/images/edits", data={"model": "realesr-animevideov3", "scale_factor": "4"},
                         files={"image": ("a.png", buffer.getvalue())})


def _assert_job_stopped(url: str, engine: HeldEngine, tiles_before: float) -> None:
    # The queue's depth counts the running job until its worker returns: at 0 the job has ended, its tiles are final.
    poll(lambda: _metric(url, "loupe_queue_depth") == 0, "the job to stop")
    settled = _metric(url, "loupe_tiles_processed_total") - tiles_before
    assert engine.mid_run.is_set() and engine.first_report is not None, "the job never ran a tile"
    done, total = engine.first_report
    assert total == LONG_TILES and 2 * done < total, engine.first_report  # a batch was still to come
    assert 0 < settled < LONG_TILES  # it had started, and it did not run to the end


def test_a_request_over_its_time_limit_is_cancelled_and_answered_504(weights_dir: Path, tmp_path: Path) -> None:
    # The time limit is what is tested: 20 s, far beyond a warm model's first tiles (about 1 s here); the job is held
    # mid-run (HeldEngine) until the limit cancels it, so it outlasts the limit however fast the machine.
    app, engine = _held_app(loupe_settings(weights_dir, tmp_path, request_timeout_s=20.0, tile_size=32))
    with serve(app) as url:
        assert _edit(url, "realesr-animevideov3", scale_factor="4").status_code == 200  # the model is loaded
        tiles_before = _metric(url, "loupe_tiles_processed_total")
        engine.armed.set()
        with httpx.Client(timeout=120) as client:
            slow = client.send(_long_job_parts(url))
        assert engine.mid_run.is_set()  # tiles ran before the 504
        assert slow.status_code == 504
        assert slow.json()["error"]["code"] == "REQUEST_TIMEOUT"
        assert slow.headers["x-should-retry"] == "false"
        _assert_job_stopped(url, engine, tiles_before)
        assert _edit(url, "realesr-animevideov3").status_code == 200


def test_a_client_that_hangs_up_stops_its_local_job(weights_dir: Path, tmp_path: Path) -> None:
    app, engine = _held_app(loupe_settings(weights_dir, tmp_path, tile_size=32))
    engine.armed.set()
    with serve(app) as url:
        request = _long_job_parts(url)
        body = request.read()
        head = (f"POST /v1/images/edits HTTP/1.1\r\nHost: {request.url.netloc.decode()}\r\n"
                f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n"
                f"X-Request-Id: hang-up-0001\r\n\r\n")
        with socket.create_connection((request.url.host, request.url.port)) as connection:
            connection.sendall(head.encode() + body)
            assert engine.mid_run.wait(120), "the job never ran a tile"
            assert _metric(url, "loupe_tiles_processed_total") > 0
        # The socket is closed: the client has hung up on a job that is running.
        _assert_job_stopped(url, engine, 0)
