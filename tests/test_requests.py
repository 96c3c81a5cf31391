"""Async edits, the requests API and signed webhooks, against the real app on a fake engine, over real HTTP.

A webhook receiver is a real HTTP server on 127.0.0.1 (so these servers allow private URLs, as a test
must); signatures are checked with the `standardwebhooks` package, as a receiver would.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request, Response
from PIL import Image
from standardwebhooks import Webhook

from server.api.tracking import Tracker
from server.app import create_app
from server.config import SettingsError
from server.errors import InternalError, QueueFull
from server.request_store import MIGRATIONS, RequestRow, RequestStore
from server.webhooks import Deliverer, load_secret
from tests import photos
from tests.conftest import loupe_settings
from tests.fake_engine import FakeEngine
from tests.servers import free_port, serve

MODEL = "realesrgan-x4plus"


def png(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "teal").save(buffer, "PNG")
    return buffer.getvalue()


class Receiver:
    """A webhook receiver: answers each POST with the next status of `statuses` (then 200); with `hold`, only once
    that event is set (or after 60 s)."""

    def __init__(self, statuses: list[int] | None = None, hold: threading.Event | None = None) -> None:
        self.statuses = list(statuses or [])
        self.hold = hold
        self.calls: list[tuple[dict[str, str], bytes, float]] = []
        self.app = FastAPI()
        self.app.post("/hook")(self._hook)
        self.url = ""

    async def _hook(self, request: Request) -> Response:
        self.calls.append((dict(request.headers), await request.body(), time.monotonic()))
        if self.hold is not None:
            await asyncio.to_thread(self.hold.wait, 60)
        return Response(status_code=self.statuses.pop(0) if self.statuses else 200)

    def wait_for(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < count:
            assert time.monotonic() < deadline, f"{len(self.calls)} webhook calls, expected {count}"
            time.sleep(0.02)


@contextmanager
def loupe(tmp_path: Path, engine: FakeEngine | None = None, **overrides: object) -> Iterator[httpx.Client]:
    settings = loupe_settings(Path("weights"), tmp_path / "data",
                              **{"allow_private_urls": True, "webhook_retry_s": [0.05, 0.1, 0.2], **overrides})
    fake = engine or FakeEngine(settings)
    with serve(create_app(settings, lambda _: fake)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def submit(client: httpx.Client, headers: dict[str, str] | None = None, **fields: str) -> httpx.Response:
    return client.post("/v1/images/edits", data={"model": MODEL, **fields}, files={"image": ("a.png", png())},
                       headers=headers or {})


def wait_status(client: httpx.Client, request_id: str, *statuses: str, headers: dict[str, str] | None = None,
                timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/requests/{request_id}", headers=headers or {}).json()
        if body.get("status") in statuses:  # (a request just sent may not be recorded yet)
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.02)


def test_an_async_edit_is_accepted_runs_and_posts_its_signed_result(tmp_path: Path) -> None:
    receiver = Receiver()
    with serve(receiver.app) as receiver_url, loupe(tmp_path) as client:
        accepted = submit(client, webhook_url=f"{receiver_url}/hook")

        assert accepted.status_code == 202
        body = accepted.json()
        assert body | {"created": 0} == {"id": body["id"], "object": "image.request", "status": "pending",
                                         "created": 0, "model": MODEL}
        assert accepted.headers["location"] == f"/v1/requests/{body['id']}"
        done = wait_status(client, body["id"], "completed")
        assert done["result"]["size"] == "128x96" and done["result"]["data"][0]["url"].startswith("http://")
        assert done["executed_model"] == f"fake/{MODEL}" and done["provider"] == "local" and done["error"] is None
        assert done["created"] <= done["started_at"] <= done["completed_at"]
        assert client.get(done["result"]["data"][0]["url"]).status_code == 200

        receiver.wait_for(1)
        headers, payload, _ = receiver.calls[0]
        secret = client.get("/v1/webhooks/secret").json()["secret"]
        assert secret.startswith("whsec_")
        delivered = Webhook(secret).verify(payload, headers)
        assert delivered["id"] == body["id"] and delivered["status"] == "completed"
        assert delivered["result"] == done["result"]
        assert headers["webhook-id"].startswith(f"msg_{body['id']}_")
        with pytest.raises(Exception):
            Webhook("whsec_" + "A" * 43 + "=").verify(payload, headers)  # another secret does not verify
        attempts = wait_status(client, body["id"], "completed")["webhook_attempts"]
        assert [(a["attempt"], a["status_code"], a["delivered"]) for a in attempts] == [(1, 200, True)]


def test_prefer_respond_async_runs_in_the_background_without_a_webhook(tmp_path: Path) -> None:
    with loupe(tmp_path) as client:
        accepted = submit(client, headers={"Prefer": "wait=5, respond-async"})
        assert accepted.status_code == 202 and accepted.headers["preference-applied"] == "respond-async"
        done = wait_status(client, accepted.json()["id"], "completed")
        assert done["webhook_url"] is None and done["webhook_attempts"] == []
        inline = submit(client, headers={"Prefer": "respond-async"}, response_format="b64_json")
        assert inline.status_code == 400 and inline.json()["error"]["param"] == "response_format"


def test_an_async_job_a_cluster_refuses_as_it_is_sent_waits_and_completes(tmp_path: Path) -> None:
    settings = loupe_settings(Path("weights"), tmp_path / "data")
    cluster = FakeEngine(settings, refused_runs=2)  # a Ray cluster's queue, full for the first two sends
    with loupe(tmp_path, cluster) as client:
        accepted = submit(client, headers={"Prefer": "respond-async"})
        done = wait_status(client, accepted.json()["id"], "completed", "failed")
    assert done["status"] == "completed" and done["error"] is None
    assert cluster.runs == 1 and cluster.refused_runs == 0


def test_a_failing_receiver_is_retried_and_every_attempt_is_recorded(tmp_path: Path) -> None:
    receiver = Receiver(statuses=[500, 503])
    with serve(receiver.app) as receiver_url, loupe(tmp_path) as client:
        request_id = submit(client, webhook_url=f"{receiver_url}/hook").json()["id"]
        receiver.wait_for(3)
        ids = {headers["webhook-id"] for headers, _, _ in receiver.calls}
        assert len(ids) == 1  # one message, retried: receivers can drop the duplicates
        assert ids.pop().startswith(f"msg_{request_id}_")
        gaps = [later[2] - earlier[2] for earlier, later in zip(receiver.calls, receiver.calls[1:])]
        assert gaps[0] >= 0.05 and gaps[1] >= 0.1
        deadline = time.monotonic() + 10
        while len(attempts := client.get(f"/v1/requests/{request_id}").json()["webhook_attempts"]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert [(a["status_code"], a["delivered"]) for a in attempts] == [(500, False), (503, False), (200, True)]
        assert client.get(f"/v1/requests/{request_id}").json()["status"] == "completed"  # the result is kept


def test_a_receiver_that_hangs_delays_no_other_job(tmp_path: Path) -> None:
    receiver = Receiver(hold=threading.Event())
    with serve(receiver.app) as receiver_url, loupe(tmp_path, webhook_timeout_s=60, webhook_retry_s=[]) as client:
        try:
            first = submit(client, webhook_url=f"{receiver_url}/hook").json()["id"]
            receiver.wait_for(1)  # the receiver holds the first one's webhook, and goes on holding it
            assert submit(client).status_code == 200
            # An attempt is recorded as it ends: none yet, so the other job ran while the webhook was outstanding.
            assert client.get(f"/v1/requests/{first}").json()["webhook_attempts"] == []
        finally:
            receiver.hold.set()  # type: ignore[union-attr]
        deadline = time.monotonic() + 60
        while not (attempts := client.get(f"/v1/requests/{first}").json()["webhook_attempts"]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert [(a["status_code"], a["delivered"]) for a in attempts] == [(200, True)]


def test_a_receiver_that_does_not_answer_in_time_is_given_up_on(tmp_path: Path) -> None:
    # The receiver answers only once the attempt has been recorded: only the 0.3 s timeout can have ended it.
    receiver = Receiver(hold=threading.Event())
    with serve(receiver.app) as receiver_url, loupe(tmp_path, webhook_timeout_s=0.3, webhook_retry_s=[]) as client:
        try:
            first = submit(client, webhook_url=f"{receiver_url}/hook").json()["id"]
            assert wait_status(client, first, "completed")["status"] == "completed"
            deadline = time.monotonic() + 60
            while not (attempts := client.get(f"/v1/requests/{first}").json()["webhook_attempts"]):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert len(receiver.calls) == 1
        finally:
            receiver.hold.set()  # type: ignore[union-attr]
        assert attempts[0]["error"] == "no answer within 0.3 s" and not attempts[0]["delivered"]
        assert attempts[0]["status_code"] is None


@pytest.mark.parametrize("url, message", [
    ("ftp://example.org/hook", "webhook_url must use http or https"),
    ("http://example.org/" + "a" * 2100, "webhook_url is longer than 2048 characters"),
    ("not a url", "webhook_url must be absolute"),
    ("http://10.1.2.3/hook", "non-public address (private)"),
    ("http://127.0.0.1:9/hook", "non-public address (loopback)"),
])
def test_a_bad_webhook_url_is_a_400_at_once(url: str, message: str, tmp_path: Path) -> None:
    engine = FakeEngine(loupe_settings(Path("weights"), tmp_path))
    with loupe(tmp_path, engine, allow_private_urls=False) as client:
        refused = submit(client, webhook_url=url)
        assert refused.status_code == 400
        assert refused.headers["x-should-retry"] == "false"
        error = refused.json()["error"]
        assert error["param"] == "webhook_url" and message in error["message"]
        assert engine.runs == 0
        recorded = client.get(f"/v1/requests/{refused.headers['x-request-id']}").json()
        assert recorded["status"] == "failed" and recorded["error"] == error


def test_every_sync_edit_is_recorded_under_its_request_id_and_the_sdk_is_unchanged(tmp_path: Path) -> None:
    with loupe(tmp_path) as client:
        sdk = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", max_retries=0)
        result = sdk.images.edit(model=MODEL, image=("a.png", png()), prompt="",
                                 extra_headers={"X-Request-Id": "sync-record-0001"},
                                 extra_body={"response_format": "b64_json"})
        assert result.data[0].b64_json
        record = client.get("/v1/requests/sync-record-0001").json()
        assert record["status"] == "completed" and record["result"]["size"] == result.size
        assert record["result"]["data"] == [{"b64_json": None}]  # the caller has the image: no second copy

        missing = submit(client, headers={"X-Request-Id": "sync-record-0002"}, model="no-such-model")
        assert missing.status_code == 404
        assert client.get("/v1/requests/sync-record-0002").json()["error"]["code"] == "MODEL_NOT_FOUND"


def test_cancel_a_pending_and_a_processing_request(tmp_path: Path) -> None:
    engine = FakeEngine(loupe_settings(Path("weights"), tmp_path), busy_for_s=0.05)  # every device is full
    refusals, ended = [0], threading.Event()
    reserve, run = engine.reserve, engine.run

    def counted_reserve(*args: Any, **kwargs: Any) -> Any:
        try:
            return reserve(*args, **kwargs)
        except QueueFull:
            refusals[0] += 1
            raise

    async def marked_run(*args: Any, **kwargs: Any) -> Any:
        try:
            return await run(*args, **kwargs)
        finally:
            ended.set()

    engine.reserve, engine.run = counted_reserve, marked_run  # type: ignore[method-assign]
    receiver = Receiver()
    with serve(receiver.app) as receiver_url, loupe(tmp_path, engine) as client:
        pending = submit(client, webhook_url=f"{receiver_url}/hook").json()["id"]
        # Refused by the busy engine, waited, and refused again: it is waiting its turn.
        deadline = time.monotonic() + 60
        while refusals[0] < 2:
            assert time.monotonic() < deadline, f"{refusals[0]} refusals"
            time.sleep(0.02)
        assert client.get(f"/v1/requests/{pending}").json()["status"] == "pending"  # waiting its turn
        cancelled = client.delete(f"/v1/requests/{pending}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        receiver.wait_for(1)
        assert json.loads(receiver.calls[0][1])["status"] == "cancelled"

        engine.busy_for_s, engine.gate = None, threading.Event()  # a device takes the next one, and holds it
        running = submit(client, headers={"Prefer": "respond-async"}, webhook_url=f"{receiver_url}/hook").json()["id"]
        wait_status(client, running, "processing")
        assert client.delete(f"/v1/requests/{running}").json()["status"] == "cancelled"
        engine.gate.set()
        assert ended.wait(60), "the cancelled run never ended"  # nothing of the run is left to finish
        receiver.wait_for(2)  # its one webhook: sent once its ending was recorded
        assert json.loads(receiver.calls[1][1])["status"] == "cancelled"
        after = client.get(f"/v1/requests/{running}").json()
        assert after["status"] == "cancelled" and after["result"] is None and after["error"]["code"] == "CANCELLED"
        assert client.delete(f"/v1/requests/{running}").json()["status"] == "cancelled"  # idempotent
        assert client.delete("/v1/requests/no-such-request").status_code == 404

        engine.gate.clear()  # a sync edit in flight is cancelled too: its caller gets the error at once
        answer: dict[str, httpx.Response] = {}
        caller = threading.Thread(target=lambda: answer.setdefault(
            "sync", submit(client, headers={"X-Request-Id": "sync-cancelled-01"})))
        caller.start()
        wait_status(client, "sync-cancelled-01", "processing")
        assert client.delete("/v1/requests/sync-cancelled-01").json()["status"] == "cancelled"
        caller.join(timeout=10)
        assert answer["sync"].status_code == 499 and answer["sync"].json()["error"]["code"] == "CANCELLED"


def test_a_key_sees_only_its_own_requests(tmp_path: Path) -> None:
    key_a, key_b = "key-a-0123456789ab", "key-b-0123456789ab"
    with loupe(tmp_path, api_keys=[key_a, key_b]) as client:
        alice, bob = {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}
        mine = submit(client, headers={**alice, "Prefer": "respond-async"}).json()["id"]
        wait_status(client, mine, "completed", headers=alice)
        assert client.get(f"/v1/requests/{mine}", headers=bob).status_code == 404
        assert client.delete(f"/v1/requests/{mine}", headers=bob).status_code == 404
        assert client.get("/v1/requests", headers=bob).json()["data"] == []
        assert [r["id"] for r in client.get("/v1/requests", headers=alice).json()["data"]] == [mine]
        assert client.get("/v1/requests").status_code == 401
        # Ids are each key's own: B's request under A's id is B's, and A's record is untouched.
        theirs = submit(client, headers={**bob, "X-Request-Id": mine})
        assert theirs.status_code == 200, theirs.text
        assert client.get(f"/v1/requests/{mine}", headers=bob).json()["status"] == "completed"
        assert client.get(f"/v1/requests/{mine}", headers=alice).json()["result"]["data"][0]["url"] != \
            client.get(f"/v1/requests/{mine}", headers=bob).json()["result"]["data"][0]["url"]


def test_requests_are_listed_newest_first_by_pages_and_status(tmp_path: Path) -> None:
    engine = FakeEngine(loupe_settings(Path("weights"), tmp_path))
    with loupe(tmp_path, engine) as client:
        ids = [f"listed-request-{index}" for index in range(5)]
        for request_id in ids:
            assert submit(client, headers={"X-Request-Id": request_id}).status_code == 200
        engine.fail_with = InternalError("the disk refused the result")
        assert submit(client, headers={"X-Request-Id": "listed-failure"}).status_code == 500

        first = client.get("/v1/requests", params={"limit": 2}).json()
        assert [r["id"] for r in first["data"]] == ["listed-failure", ids[4]] and first["has_more"]
        second = client.get("/v1/requests", params={"limit": 3, "after": first["last_id"]}).json()
        assert [r["id"] for r in second["data"]] == [ids[3], ids[2], ids[1]] and second["has_more"]
        last = client.get("/v1/requests", params={"limit": 3, "after": second["last_id"]}).json()
        assert [r["id"] for r in last["data"]] == [ids[0]] and not last["has_more"]
        failed = client.get("/v1/requests", params={"status": "failed"}).json()["data"]
        assert [(r["id"], r["error"]["type"]) for r in failed] == [("listed-failure", "server_error")]
        for params in ({"limit": 0}, {"limit": 101}, {"status": "done"}):
            assert client.get("/v1/requests", params=params).status_code == 400
        assert client.get("/v1/requests", params={"after": "nobody"}).status_code == 404


def test_sixteen_async_submissions_at_once_all_complete_with_distinct_ids(tmp_path: Path) -> None:
    with loupe(tmp_path) as client:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: submit(client, headers={"Prefer": "respond-async"}), range(16)))
        assert [answer.status_code for answer in answers] == [202] * 16
        ids = {answer.json()["id"] for answer in answers}
        assert len(ids) == 16
        for request_id in ids:
            assert wait_status(client, request_id, "completed", "failed")["status"] == "completed"


# The store on its own: schema, expiry, start-up faults.

def test_records_expire_with_their_results_but_never_while_running(tmp_path: Path) -> None:
    store = RequestStore(tmp_path / "loupe.db")
    now = time.time()
    for request_id, status, ended in (("old", "completed", now - 100), ("fresh", "failed", now - 1),
                                      ("running", "processing", None), ("waiting", "pending", None)):
        store.claim(RequestRow(id=request_id, owner=None, status=status, created=now - 200, completed_at=ended,
                                model=MODEL, background=True))
    assert store.expire(ttl_s=50, now=now) == 1
    assert store.get(None, "old") is None
    assert {row.id for row in store.with_status("processing", "pending", "failed")} == {"fresh", "running", "waiting"}
    assert store.schema_version == len(MIGRATIONS)
    assert sqlite3.connect(tmp_path / "loupe.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_corrupt_or_newer_database_is_a_start_up_error_naming_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SettingsError, match=str(corrupt)):
        RequestStore(corrupt)
    newer = tmp_path / "newer.db"
    sqlite3.connect(newer).execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(SettingsError, match="newer than this Loupe"):
        RequestStore(newer)
    directory = tmp_path / "a-folder.db"
    directory.mkdir()
    with pytest.raises(SettingsError, match=str(directory)):
        RequestStore(directory)


# A real server process, stopped and started on the same data dir.

def _start_server(data_dir: Path, weights_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LOUPE_WEIGHTS_DIR": str(weights_dir), "LOUPE_DATA_DIR": str(data_dir),
           "LOUPE_DEVICE": "cpu", "LOUPE_TILE_SIZE": "32", "LOUPE_ALLOW_PRIVATE_URLS": "true",
           "LOUPE_WEBHOOK_RETRY_S": "0.2,0.5"}
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env=env)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def _photo(side: int = 96) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photos.astronaut((side, side))).save(buffer, "PNG")
    return buffer.getvalue()


def _wait_mid_run(url: str, request_id: str) -> dict[str, Any]:
    """The first progress event of a running job with at least half its tiles still to run."""
    with httpx.stream("GET", f"{url}/v1/progress/{request_id}", timeout=120) as events:
        assert events.status_code == 200
        for line in events.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            assert event["stage"] not in ("encoding", "done", "failed"), event  # too late to kill it mid-run
            if event["stage"] == "running" and event["total"] > 0 and 2 * event["done"] <= event["total"]:
                return event
    raise AssertionError(f"the progress stream of {request_id} ended before the job ran")


@pytest.mark.slow
def test_records_survive_restarts_a_killed_job_fails_and_a_stopped_one_runs_again(
        tmp_path: Path, weights_dir: Path) -> None:
    receiver = Receiver()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve(receiver.app) as receiver_url:
        def submit_slow(client: httpx.Client, side: int = 96) -> str:
            answer = client.post("/v1/images/edits", data={"model": MODEL, "webhook_url": f"{receiver_url}/hook"},
                                 files={"image": ("photo.png", _photo(side))})
            assert answer.status_code == 202, answer.text
            return answer.json()["id"]

        server = _start_server(tmp_path, weights_dir, port)
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                # 160² in 32-px tiles: 25 tiles, seconds of x4plus on a CPU; the half of it still to run when it is
                # killed leaves no race with its end.
                killed = submit_slow(client, side=160)
                wait_status(client, killed, "processing", timeout=60)
                _wait_mid_run(url, killed)
            server.kill()  # mid-run, as a crash would
            server.wait(timeout=30)

            server = _start_server(tmp_path, weights_dir, port)
            with httpx.Client(base_url=url, timeout=30) as client:
                record = wait_status(client, killed, "failed")
                assert record["error"]["code"] == "INTERRUPTED" and "send it again" in record["error"]["message"]
                receiver.wait_for(1)
                assert json.loads(receiver.calls[0][1])["error"]["code"] == "INTERRUPTED"

                stopped = submit_slow(client)
                wait_status(client, stopped, "processing", timeout=60)
                server.send_signal(signal.SIGTERM)  # a clean stop puts the running job back in the queue
                assert server.wait(timeout=60) in (0, -signal.SIGTERM)

            server = _start_server(tmp_path, weights_dir, port)
            with httpx.Client(base_url=url, timeout=30) as client:
                done = wait_status(client, stopped, "completed", timeout=120)
                assert done["result"]["size"] == "384x384"
                assert client.get(done["result"]["data"][0]["url"]).status_code == 200
                assert client.get(f"/v1/requests/{killed}").json()["status"] == "failed"  # still on record
                receiver.wait_for(2)
                assert json.loads(receiver.calls[1][1])["status"] == "completed"
        finally:
            if server.poll() is None:
                server.kill()


def test_a_webhook_a_shutdown_cut_short_is_resumed_at_the_next_start(tmp_path: Path) -> None:
    receiver = Receiver()
    store = RequestStore(tmp_path / "loupe.db")
    with serve(receiver.app) as receiver_url:
        now = time.time()
        for request_id, attempts in (("cut-short", [{"attempt": 1, "at": now, "seconds": 30.0, "status_code": None,
                                                     "error": "no answer within 30 s", "delivered": False}]),
                                     ("given-up", [{"attempt": number, "at": now, "seconds": 0.1, "status_code": 500,
                                                    "error": None, "delivered": False} for number in (1, 2)])):
            store.claim(RequestRow(id=request_id, owner=None, status="completed", created=now, completed_at=now,
                                   model=MODEL, background=True, webhook_url=f"{receiver_url}/hook",
                                   webhook_attempts=attempts))
        settings = loupe_settings(Path("weights"), tmp_path / "data", allow_private_urls=True, webhook_retry_s=[0.05])
        tracker = Tracker(store, Deliverer(settings, load_secret(settings)), tmp_path / "inputs")

        async def restart() -> None:
            assert await tracker.recover() == []
            await tracker.close()  # as the server's shutdown: the deliveries in flight end, and their records land

        asyncio.run(restart())

    assert [json.loads(body)["id"] for _, body, _ in receiver.calls] == ["cut-short"]  # "given-up" had its 2 tries
    attempts = store.get(None, "cut-short").webhook_attempts
    assert [(a["attempt"], a["delivered"]) for a in attempts] == [(1, False), (2, True)]


def test_a_database_replaced_under_the_store_is_noticed_and_its_records_saved(tmp_path: Path) -> None:
    store = RequestStore(tmp_path / "loupe.db")
    store.claim(RequestRow(id="kept-record-1", owner=None, status="completed", created=time.time(), model=MODEL,
                           background=False))
    assert store.vanished() is None
    (tmp_path / "loupe.db").rename(tmp_path / "elsewhere.db")
    sqlite3.connect(tmp_path / "loupe.db").close()  # another, empty file where it was
    problem = store.vanished()
    assert problem is not None and "replaced" in problem and "loupe.db.rescued" in problem
    store.claim(RequestRow(id="kept-record-2", owner=None, status="completed", created=time.time(), model=MODEL,
                           background=False))
    store.close()  # saved again at the close, with what was written since
    rescued = RequestStore(tmp_path / "loupe.db.rescued")
    assert {row.id for row in rescued.with_status("completed")} == {"kept-record-1", "kept-record-2"}
