"""The request store's faults against a real `loupe serve`: a database another process locks, a full disk, and a
database file deleted under the running server. No job's end is lost, nothing answers 500, and what clears by
itself says so."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.processes import loupe_env, loupe_serve, png, poll, run_loupe
from tests.servers import free_port, serve
from tests.test_requests import Receiver

MODEL = "realesr-animevideov3"


def _edit(client: httpx.Client, *, request_id: str, **fields: str) -> httpx.Response:
    return client.post("/v1/images/edits", headers={"X-Request-Id": request_id},
                       data={"model": MODEL, "scale_factor": "2", **fields}, files={"image": ("in.png", png())})


def _record(client: httpx.Client, request_id: str) -> dict[str, object] | None:
    answer = client.get(f"/v1/requests/{request_id}")
    return answer.json() if answer.status_code == 200 else None


@contextlib.contextmanager
def _locked(database: Path) -> Iterator[None]:
    """Another process's write lock on the database, as an operator's `sqlite3` shell or a backup tool holds it."""
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.slow
def test_a_locked_database_is_waited_out_and_no_jobs_end_is_lost_even_in_a_crash(
        tmp_path: Path, weights_dir: Path) -> None:
    receiver = Receiver()
    data = tmp_path / "data"
    env = loupe_env(weights_dir, data, tile_size=32, allow_private_urls="true", webhook_retry_s="0.2")
    port = free_port()  # the same after the restart: result URLs name it
    with serve(receiver.app) as receiver_url:
        with loupe_serve(env, tmp_path / "first.log", port=port) as served, httpx.Client(base_url=served.url, timeout=60) as client:
            with _locked(data / "loupe.db"):
                # What needs no record still works; what needs one waits it out, then says to come back.
                assert _edit(client, request_id="sync-while-locked", response_format="b64_json").status_code == 200
                refused = _edit(client, request_id="async-while-locked", webhook_url=f"{receiver_url}/hook")
                assert (refused.status_code, refused.json()["error"]["code"]) == (503, "DATABASE_BUSY")
                assert refused.headers["x-should-retry"] == "true" and int(refused.headers["retry-after"]) >= 1
                assert client.get("/v1/requests").status_code == 200  # readers never wait on a writer
            # Unlocked: the sync edit's record, kept meanwhile, lands.
            poll(lambda: (_record(client, "sync-while-locked") or {}).get("status") == "completed",
                 "the kept record to land")

            slow = client.post("/v1/images/edits", headers={"X-Request-Id": "ends-while-locked"},
                               data={"model": MODEL, "scale_factor": "4", "output_format": "jpeg",
                                     "webhook_url": f"{receiver_url}/hook"},
                               files={"image": ("slow.png", png((480, 480)))})
            assert slow.status_code == 202, slow.text
            with _locked(data / "loupe.db"):
                # The job ends while the store refuses writes: its end is journaled on disk, and no webhook goes
                # before the record has it. Then the process dies.
                poll(lambda: any((data / "requests" / "endings").glob("*.json")), "the end to be journaled",
                     timeout=300)
                assert receiver.calls == []
                served.process.send_signal(signal.SIGKILL)
                served.process.wait(timeout=60)

        with loupe_serve(env, tmp_path / "second.log", port=port) as served, \
                httpx.Client(base_url=served.url, timeout=60) as client:
            record = _record(client, "ends-while-locked")
            assert record is not None and record["status"] == "completed", record  # not INTERRUPTED
            result = client.get(record["result"]["data"][0]["url"])
            assert result.status_code == 200 and result.headers["content-type"] == "image/jpeg"
            receiver.wait_for(1, timeout=60)
            assert json.loads(receiver.calls[0][1])["status"] == "completed"
            assert list((data / "requests" / "endings").glob("*.json")) == []
            assert list((data / "requests").glob("*.input")) == []  # the kept image went with the end


@contextlib.contextmanager
def _small_disk(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small disk needs root and mount: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the disk `folder` is on to the last byte."""
    filler = folder / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(descriptor, b"\0" * size)
    finally:
        os.close(descriptor)
    return filler


def test_a_full_data_disk_fails_only_what_needs_the_disk(tmp_path: Path, weights_dir: Path) -> None:
    with _small_disk(tmp_path / "disk", "16m") as disk:
        env = loupe_env(weights_dir, disk / "data")
        with loupe_serve(env, tmp_path / "loupe.log") as served, httpx.Client(base_url=served.url, timeout=60) as client:
            assert _edit(client, request_id="before-the-disk-fills").status_code == 200
            filler = _fill(disk)
            kept = _edit(client, request_id="b64-on-a-full-disk", response_format="b64_json")
            assert kept.status_code == 200, kept.text
            unknown = client.post("/v1/images/edits", data={"model": "no-such-model"}, files={"image": ("a.png", png())})
            assert unknown.status_code == 404
            url_result = _edit(client, request_id="url-on-a-full-disk")
            assert (url_result.status_code, url_result.json()["error"]["code"]) == (507, "STORAGE_UNAVAILABLE")
            assert "b64_json" in url_result.json()["error"]["message"]
            async_edit = client.post("/v1/images/edits", headers={"Prefer": "respond-async"},
                                     data={"model": MODEL}, files={"image": ("a.png", png())})
            assert async_edit.status_code == 507, async_edit.text
            assert client.get("/v1/requests").status_code == 200
            assert httpx.get(f"{served.url}/readyz").status_code == 200
            filler.unlink()
            # The records kept while the disk was full land once there is room.
            poll(lambda: (_record(client, "b64-on-a-full-disk") or {}).get("status") == "completed",
                 "the record kept through the full disk to land")
            assert _edit(client, request_id="after-the-disk-has-room").status_code == 200
        assert "Traceback" not in served.log_text()


def test_a_database_deleted_under_the_server_is_noticed_saved_and_never_silently_replaced(
        tmp_path: Path, weights_dir: Path) -> None:
    data = tmp_path / "data"
    env = loupe_env(weights_dir, data)
    database = data / "loupe.db"
    with loupe_serve(env, tmp_path / "first.log") as served, httpx.Client(base_url=served.url, timeout=60) as client:
        assert _edit(client, request_id="kept-through-it").status_code == 200
        assert httpx.get(f"{served.url}/readyz").status_code == 200
        database.unlink()
        ready = httpx.get(f"{served.url}/readyz")
        assert ready.status_code == 503 and "deleted" in ready.json()["database"]
        assert str(data) not in ready.text
        assert _edit(client, request_id="after-it-vanished").status_code == 200  # still serving meanwhile
        assert served.stop() in (0, -signal.SIGTERM)
    assert "the request database was moved under the running server" in served.log_text()
    rescued = data / "loupe.db.rescued"
    assert rescued.exists() and not database.exists()

    refused = run_loupe("serve", "--port", "1", env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "missing" in line and str(database) in line and "loupe.db.rescued" in line

    os.replace(rescued, database)
    with loupe_serve(env, tmp_path / "second.log") as served, httpx.Client(base_url=served.url, timeout=60) as client:
        assert (_record(client, "kept-through-it") or {}).get("status") == "completed"
        assert (_record(client, "after-it-vanished") or {}).get("status") == "completed"
