"""The app around the engine, over a fake engine: routing, fallback, admission, limits, errors, progress, metrics.

Each test runs the real app on 127.0.0.1, driven by the openai SDK; only the engine is fake (a Lanczos
resample, see tests/fake_engine.py), so these run in milliseconds rather than model seconds.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from server.app import create_app
from server.errors import (
    Cancelled,
    InvalidInput,
    ModelUnavailable,
    OutOfDeviceMemory,
    QueueFull,
    StorageFull,
    UpstreamFailed,
)
from tests import photos
from tests.conftest import loupe_settings
from tests.fake_engine import FakeEngine
from tests.fake_upstreams import FAL_KEY, FakeFal
from tests.servers import serve



@contextmanager
def loupe(tmp_path: Path, engine: dict[str, Any] | None = None, **overrides: Any) -> Iterator[tuple[str, FakeEngine]]:
    """Loupe over a fake engine (made with `engine` as its options); yields its URL and the engine."""
    made: list[FakeEngine] = []

    def factory(settings: Any) -> FakeEngine:
        made.append(FakeEngine(settings, **(engine or {})))
        return made[0]

    app = create_app(loupe_settings(tmp_path / "weights", tmp_path / "data", **overrides), engine_factory=factory)
    with serve(app) as url:
        yield url, made[0]


def sdk(url: str, key: str = "client-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def png(width: int = 32, height: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photos.coffee((width, height))).save(buffer, format="PNG")
    return buffer.getvalue()


def edit(url: str, model: str = "realesr-animevideov3", scale: float = 2, image: bytes | None = None,
         key: str = "client-key", **options: Any) -> Any:
    return sdk(url, key).images.with_raw_response.edit(
        model=model, image=("in.png", image or png()), prompt="x", extra_body={"scale_factor": scale}, **options)


def refused(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def test_a_local_job_runs_on_the_engine_and_answers_in_the_gateway_shape(tmp_path: Path) -> None:
    with loupe(tmp_path) as (url, engine):
        raw = edit(url, response_format="b64_json")
    body = raw.http_response.json()
    assert body["size"] == "64x48" and body["metadata"]["provider"] == "local"
    assert body["metadata"]["executed_model"] == "fake/realesr-animevideov3"
    picture = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert picture.size == (64, 48)
    assert engine.runs == 1 and all(r.released for r in engine.reservations)


def test_n_copies_of_a_deterministic_result_are_one_job_and_one_encoding(tmp_path: Path) -> None:
    with loupe(tmp_path) as (url, engine):
        raw = edit(url, response_format="b64_json", n=10)
    items = raw.http_response.json()["data"]
    assert len(items) == 10 and len({item["b64_json"] for item in items}) == 1
    assert (engine.runs, len(engine.reservations)) == (1, 1)
    with loupe(tmp_path) as (url, engine):
        stored = edit(url, n=3).http_response.json()["data"]
    assert len(stored) == 3 and len({item["url"] for item in stored}) == 1  # one file for the three copies
    assert len(list((tmp_path / "data" / "results").iterdir())) == 1


def test_a_model_without_local_weights_goes_to_fal(tmp_path: Path, fal: FakeFal) -> None:
    with loupe(tmp_path, {"missing": {"realesr-animevideov3"}}, fal_key=FAL_KEY, fal_url=fal.url) as (url, engine):
        raw = edit(url)
    assert raw.http_response.json()["metadata"]["provider"] == "fal"
    assert engine.runs == 0 and len(fal.submits) == 1


def test_without_weights_or_a_provider_the_model_is_a_503_not_worth_retrying(tmp_path: Path) -> None:
    with loupe(tmp_path, {"missing": {"realesr-animevideov3"}}) as (url, _):
        error = refused(lambda: edit(url))
    assert (error.status_code, error.code) == (503, "MODEL_UNAVAILABLE")
    assert error.response.headers["x-should-retry"] == "false"


# An engine refuses a job past its budget when it reserves a place, or, when it queues elsewhere (a Ray
# cluster's replicas), only as the job is sent.
BUSY = {"at reserve": {"busy_for_s": 7.2}, "at send": {"fail_with": QueueFull("the replicas are busy", retry_after_s=7.2)}}


@pytest.mark.parametrize("busy", BUSY.keys())
@pytest.mark.parametrize(("fallback", "provider"), [("overload", "fal"), ("unavailable", None)])
def test_a_local_engine_past_its_budget_overflows_to_fal_only_under_overload(
        tmp_path: Path, fal: FakeFal, fallback: str, provider: str | None, busy: str) -> None:
    with loupe(tmp_path, BUSY[busy], fal_key=FAL_KEY, fal_url=fal.url, fallback=fallback) as (url, _):
        if provider is not None:
            assert edit(url).http_response.json()["metadata"]["provider"] == provider
            return
        error = refused(lambda: edit(url))
    assert (error.status_code, error.code) == (429, "RATE_LIMITED")
    assert error.response.headers["retry-after"] == "8"
    assert error.response.headers["x-should-retry"] == "true"
    assert fal.submits == []


def test_the_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    # One request per 1000 s: the bucket cannot refill between two requests, however slow the machine.
    with loupe(tmp_path, rate_limit=0.001) as (url, _):
        edit(url)
        error = refused(lambda: edit(url))
    assert (error.status_code, error.code) == (429, "RATE_LIMITED")
    assert 1 <= int(error.response.headers["retry-after"]) <= 1000


# What each domain error from the engine looks like to a client: status, code, and whether the SDK retries.
ENGINE_ERRORS = [
    (InvalidInput("the picture is odd", "image"), 400, "INVALID_REQUEST", False),
    (ModelUnavailable("weights broke", code="WEIGHTS_CORRUPT"), 503, "WEIGHTS_CORRUPT", False),
    (OutOfDeviceMemory("cuda:0 ran out of memory"), 503, "DEVICE_OUT_OF_MEMORY", True),
    (Cancelled("the job was cancelled"), 499, "CANCELLED", False),
    (UpstreamFailed("down"), 502, "UPSTREAM_ERROR", True),
    (UpstreamFailed("refused our key", code="UPSTREAM_AUTH", transient=False), 502, "UPSTREAM_AUTH", False),
    (StorageFull("disk full"), 507, "STORAGE_UNAVAILABLE", False),
    (RuntimeError("a bug"), 500, "INTERNAL_ERROR", False),
]


@pytest.mark.parametrize(("error", "status", "code", "retried"), ENGINE_ERRORS,
                         ids=[type(e[0]).__name__ + "-" + e[2] for e in ENGINE_ERRORS])
def test_each_engine_error_has_one_http_answer(tmp_path: Path, error: BaseException, status: int, code: str,
                                               retried: bool) -> None:
    with loupe(tmp_path, {"fail_with": error}) as (url, _):
        response = httpx.post(f"{url}/v1/images/edits", data={"model": "realesr-animevideov3"},
                              files={"image": ("a.png", png())}, timeout=30)
    body = response.json()["error"]
    assert (response.status_code, body["code"]) == (status, code)
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert response.headers["x-should-retry"] == ("true" if retried else "false")
    assert ("retry-after" in response.headers) is retried  # what clears by itself says when to come back
    assert response.headers.get_list("x-request-id")[0].startswith("req_")


def test_an_unhandled_error_is_logged_with_its_request_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="loupe.http"), loupe(tmp_path, {"fail_with": KeyError("x")}) as (url, _):
        response = httpx.post(f"{url}/v1/images/edits", data={"model": "realesr-animevideov3"},
                              files={"image": ("a.png", png())}, headers={"X-Request-Id": "trace-me-0001"}, timeout=30)
    assert response.status_code == 500
    (record,) = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert getattr(record, "request_id") == "trace-me-0001"


def test_gateway_ids_are_models_of_their_own(tmp_path: Path) -> None:
    with loupe(tmp_path) as (url, _):
        listed = {model.id: model for model in sdk(url).models.list()}
        one = sdk(url).models.retrieve("real-esrgan")
    assert {"real-esrgan", "aura-sr", "realesrgan-x4plus"} <= set(listed)
    assert listed["real-esrgan"].model_extra["alias_of"] == "realesrgan-x4plus"
    assert (one.id, one.model_extra["alias_of"]) == ("real-esrgan", "realesrgan-x4plus")


@pytest.mark.parametrize(("kind", "save"), [
    ("GIF", {"format": "GIF", "save_all": True}),
    ("APNG", {"format": "PNG", "save_all": True}),
    ("WebP", {"format": "WEBP", "save_all": True}),
    ("TIFF", {"format": "TIFF", "save_all": True}),
])
def test_animations_and_multi_page_files_are_refused_not_cut_to_a_frame(tmp_path: Path, kind: str,
                                                                         save: dict[str, Any]) -> None:
    frames = [Image.fromarray(photos.coffee((24, 16))), Image.fromarray(photos.chelsea((24, 16)))]
    buffer = io.BytesIO()
    frames[0].save(buffer, append_images=frames[1:], **save)
    with loupe(tmp_path) as (url, engine):
        error = refused(lambda: edit(url, image=buffer.getvalue()))
    assert (error.status_code, error.code, error.body["param"]) == (400, "ANIMATED_IMAGE", "image")
    assert "2 frames" in error.body["message"] and engine.runs == 0


def test_a_data_uri_as_large_as_an_upload_is_taken(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG", compress_level=0)
    data = buffer.getvalue()
    limit = len(data) + 1000  # over 4 MiB: its base64 is past the limit plus the old 1 MiB of form overhead
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    with loupe(tmp_path, max_upload_bytes=limit) as (url, _):
        taken = httpx.post(f"{url}/v1/images/edits", timeout=60,
                           data={"model": "realesr-animevideov3", "scale_factor": "0.25", "image": uri})
        over = httpx.post(f"{url}/v1/images/edits", timeout=60, data={
            "model": "realesr-animevideov3", "image": "data:image/png;base64," + base64.b64encode(
                data + b"\0" * 2000).decode()})
    assert taken.status_code == 200, taken.text
    assert (over.status_code, over.json()["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")


def test_progress_and_ids_are_each_keys_own_and_an_id_runs_once_at_a_time(tmp_path: Path) -> None:
    gate = threading.Event()
    key_a, key_b = "key-a-0123456789ab", "key-b-0123456789ab"
    with loupe(tmp_path, {"gate": gate}, api_keys=[key_a, key_b]) as (url, engine):
        first = threading.Thread(target=lambda: edit(url, key=key_a, extra_headers={"X-Request-Id": "shared-id-1"}))
        first.start()
        try:
            assert engine.started.wait(10)
            with httpx.stream("GET", f"{url}/v1/progress/shared-id-1", headers={"Authorization": f"Bearer {key_b}"},
                              timeout=10) as stranger:
                stranger_event = json.loads(next(stranger.iter_lines()).removeprefix("data: "))
            second = refused(lambda: edit(url, key=key_a, extra_headers={"X-Request-Id": "shared-id-1"}))
            # The other key's id space is its own: the same id is free to it, and using it touches nothing of A's.
            other = httpx.post(f"{url}/v1/images/edits?dryRun=true", data={"model": "realesr-animevideov3"},
                               files={"image": ("a.png", png())},
                               headers={"Authorization": f"Bearer {key_b}", "X-Request-Id": "shared-id-1"})
            with httpx.stream("GET", f"{url}/v1/progress/shared-id-1", headers={"Authorization": f"Bearer {key_a}"},
                              timeout=10) as owner:
                first_event = json.loads(next(owner.iter_lines()).removeprefix("data: "))
                status = owner.status_code
        finally:
            gate.set()
            first.join(10)
        after = edit(url, key=key_a, extra_headers={"X-Request-Id": "shared-id-1"})  # done: the id is free again
    assert stranger_event == {"stage": "waiting", "done": 0, "total": 0}  # as for an id nobody used
    assert (second.status_code, second.code) == (409, "REQUEST_ID_IN_USE")
    assert second.response.headers["x-should-retry"] == "false"
    assert other.status_code == 200, other.text
    assert status == 200 and first_event["stage"] in ("queued", "running")
    assert after.http_response.status_code == 200


def test_metrics_count_requests_by_model_provider_and_status(tmp_path: Path) -> None:
    with loupe(tmp_path) as (url, _):
        edit(url)
        refused(lambda: edit(url, scale=-1))
        text = httpx.get(f"{url}/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("loupe_requests_total{")]
    assert any('model="realesr-animevideov3"' in line and 'status="200"' in line and 'provider="local"' in line
               for line in lines)
    assert any('status="400"' in line for line in lines)


def test_a_dry_run_then_the_run_may_share_a_request_id(tmp_path: Path) -> None:
    with loupe(tmp_path) as (url, _):
        for query in ("?dryRun=true", ""):
            response = httpx.post(f"{url}/v1/images/edits{query}", data={"model": "realesr-animevideov3"},
                                  files={"image": ("a.png", png())}, headers={"X-Request-Id": "plan-then-run"})
            assert response.status_code == 200, response.text


def test_the_read_deadline_spares_a_long_job_whose_request_is_in(tmp_path: Path) -> None:
    from server.serve import http_protocol

    gate, fired = threading.Event(), threading.Event()
    settings = loupe_settings(tmp_path / "weights", tmp_path / "data", read_timeout_s=0.5)
    engine = FakeEngine(settings, gate=gate)
    app = create_app(settings, engine_factory=lambda s: engine)

    class Watched(http_protocol(settings)):  # type: ignore[misc, valid-type]
        def _deadline_passed(self) -> None:
            super()._deadline_passed()
            fired.set()  # the connection's read deadline has come and gone: it did whatever it does

    def release() -> None:
        # The job outlasts the deadline: it ends only once the request is in, running, and its deadline has fired.
        if engine.started.wait(60):
            fired.wait(60)
        gate.set()

    with serve(app, http=Watched) as url:
        threading.Thread(target=release, daemon=True).start()
        response = httpx.post(f"{url}/v1/images/edits", data={"model": "realesr-animevideov3"},
                              files={"image": ("a.png", png())}, headers={"Connection": "close"}, timeout=120)
    assert fired.is_set(), "the read deadline never fired while the job ran"
    assert response.status_code == 200, response.text
