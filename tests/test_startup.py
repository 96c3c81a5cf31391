"""Start-up and crashes of a real `loupe serve`: every start-up fault is one line and exit 2, never a traceback; a
crash fails only the jobs that were computing, and the ones only queued run after the restart."""
from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import httpx
import pytest

from tests.processes import loupe_env, loupe_serve, png, poll, run_loupe
from tests.servers import free_port

MODEL = "realesr-animevideov3"


def _old_schema(path: Path) -> None:
    """A database of version 1 whose requests table holds other columns than Loupe's."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE requests (id TEXT PRIMARY KEY, tenant TEXT, state TEXT)")
        db.execute("PRAGMA user_version = 1")


def _foreign_columns(path: Path) -> None:
    """A database at this Loupe's version whose requests table lacks a column and has another."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE requests (owner TEXT, id TEXT, status TEXT, created REAL, model TEXT, "
                   "background INTEGER, colour TEXT, PRIMARY KEY (owner, id))")
        db.execute("PRAGMA user_version = 2")


def _secret_folder(data: Path) -> None:
    (data / "webhook-secret").mkdir(parents=True)


def _secret_garbage(data: Path) -> None:
    data.mkdir(parents=True)
    (data / "webhook-secret").write_bytes(b"\xff\xfe not a secret")


@pytest.mark.parametrize(("case", "settings", "prepare", "words"), [
    ("data dir under a file", {"data_dir": "{tmp}/a-file/data"}, lambda tmp: (tmp / "a-file").write_text("x"),
     "the data folder"),
    ("malformed webhook secret", {"webhook_secret": "not-a-secret"}, None, "LOUPE_WEBHOOK_SECRET"),
    ("weak webhook secret", {"webhook_secret": "whsec_AAAA"}, None, "at least 16 random bytes"),
    ("secret file is a folder", {}, lambda tmp: _secret_folder(tmp / "data"), "webhook-secret"),
    ("secret file is garbage", {}, lambda tmp: _secret_garbage(tmp / "data"), "webhook-secret"),
    ("old schema, foreign columns", {"database_url": "sqlite:///{tmp}/old.db"}, lambda tmp: _old_schema(tmp / "old.db"),
     "old.db"),
    ("current schema, foreign columns", {"database_url": "sqlite:///{tmp}/odd.db"},
     lambda tmp: _foreign_columns(tmp / "odd.db"), "odd.db"),
    ("unknown log level", {"log_level": "chatty"}, None, "LOUPE_LOG_LEVEL"),
    ("unknown device", {"device": "tpu"}, None, "LOUPE_DEVICE"),
])
def test_every_start_up_fault_is_one_line_and_exit_2(tmp_path: Path, weights_dir: Path, case: str,
                                                     settings: dict[str, str], prepare: object, words: str) -> None:
    if callable(prepare):
        prepare(tmp_path)
    values = {name: value.replace("{tmp}", str(tmp_path)) for name, value in settings.items()}
    env = loupe_env(weights_dir, Path(values.pop("data_dir", tmp_path / "data")), **values)
    started = run_loupe("serve", "--port", str(free_port()), env=env, timeout=120)
    assert started.returncode == 2, (case, started.stderr[-2000:])
    lines = started.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loupe: ") and words in lines[0], (case, started.stderr[-2000:])


def test_a_port_in_use_and_a_locked_database_are_one_line_and_exit_2(tmp_path: Path, weights_dir: Path) -> None:
    env = loupe_env(weights_dir, tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = run_loupe("serve", "--port", str(taken.getsockname()[1]), env=env)
    assert busy.returncode == 2 and len(busy.stderr.strip().splitlines()) == 1
    assert "can't listen on 127.0.0.1" in busy.stderr and "LOUPE_PORT" in busy.stderr

    holder = sqlite3.connect(tmp_path / "data" / "loupe.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        locked = run_loupe("serve", "--port", str(free_port()), env=env)
    finally:
        holder.close()
    assert locked.returncode == 2 and len(locked.stderr.strip().splitlines()) == 1
    assert "loupe.db" in locked.stderr and "locked" in locked.stderr


def _status(client: httpx.Client, request_id: str) -> dict[str, object]:
    return client.get(f"/v1/requests/{request_id}").json()


@pytest.mark.slow
def test_a_crash_fails_the_job_computing_and_the_one_only_queued_runs_after_the_restart(
        tmp_path: Path, weights_dir: Path) -> None:
    env = loupe_env(weights_dir, tmp_path / "data", tile_size=32)
    port = free_port()
    with loupe_serve(env, tmp_path / "first.log", port=port) as served, \
            httpx.Client(base_url=served.url, timeout=60) as client:
        computing = client.post("/v1/images/edits", headers={"Prefer": "respond-async"},
                                data={"model": MODEL, "scale_factor": "4", "output_format": "jpeg"},
                                files={"image": ("slow.png", png((480, 480)))}).json()["id"]
        poll(lambda: _status(client, computing)["status"] == "processing", "the first job to compute")
        queued = client.post("/v1/images/edits", headers={"Prefer": "respond-async"},
                             data={"model": MODEL, "scale_factor": "2"}, files={"image": ("small.png", png())})
        assert queued.status_code == 202
        # Admitted to the device's queue behind the first job, it is not computing: still pending.
        assert _status(client, queued.json()["id"])["status"] == "pending"
        assert _status(client, computing)["status"] == "processing"
        served.process.kill()
        served.process.wait(timeout=60)

    with loupe_serve(env, tmp_path / "second.log", port=port) as served, \
            httpx.Client(base_url=served.url, timeout=60) as client:
        interrupted = _status(client, computing)
        assert (interrupted["status"], interrupted["error"]["code"]) == ("failed", "INTERRUPTED")
        done = poll(lambda: (record := _status(client, queued.json()["id"]))["status"] in ("completed", "failed")
                    and record, "the queued job to run after the restart")
        assert done["status"] == "completed" and done["result"]["size"] == "64x48"
