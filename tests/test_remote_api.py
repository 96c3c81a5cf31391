"""Remote models through Loupe's own API: the openai SDK talks to Loupe, Loupe to a fake fal queue and a fake gateway.

All three are real HTTP servers on 127.0.0.1. Loupe runs with an empty weights
directory, so every model here goes remote.
"""
from __future__ import annotations

import base64
import io
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from server import catalog
from server.app import create_app
from tests.conftest import loupe_settings
from tests.fake_upstreams import FAL_KEY, GATEWAY_KEY, FakeFal, FakeGateway, pattern
from tests.servers import free_port, hanging_up_port, serve

# Every piece of a credential that must never reach a client or a log line.
SECRETS = (FAL_KEY, *FAL_KEY.split(":"), GATEWAY_KEY)


@pytest.fixture
def fal(served_fal: FakeFal) -> FakeFal:
    served_fal.reset()
    return served_fal


@contextmanager
def loupe(root: Path, **overrides: Any) -> Iterator[str]:
    """A Loupe server without local weights, so that every model it serves goes remote."""
    (root / "no-weights").mkdir(parents=True, exist_ok=True)
    settings = loupe_settings(root / "no-weights", root / "data", **overrides)
    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def remote_loupe(
    served_fal: FakeFal, served_gateway: FakeGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Loupe with both providers configured."""
    with loupe(tmp_path_factory.mktemp("loupe"), fal_key=FAL_KEY, fal_url=served_fal.url,
               fal_storage_url=served_fal.url, gateway_url=f"{served_gateway.url}/v1", gateway_key=GATEWAY_KEY,
               remote_timeout_s=30) as url:
        yield url


def sdk(url: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="client-key", **{"max_retries": 0, "timeout": 30, **options})


@pytest.fixture
def client(remote_loupe: str) -> openai.OpenAI:
    return sdk(remote_loupe)


@pytest.fixture(scope="module")
def picture_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "in.png"
    pattern(64, 48).save(path)
    return path


def edit(client: openai.OpenAI, path: Path, model: str = "crystal-upscaler", *, scale: float | None = 2,
         extra: dict[str, Any] | None = None, **options: Any) -> Any:
    """`client.images.edit` the way a user calls it; the raw response, so headers can be read too."""
    body = {"scale_factor": scale} if scale is not None else {}
    with path.open("rb") as image:
        return client.images.with_raw_response.edit(model=model, image=image, prompt="x",
                                                    extra_body={**body, **(extra or {})}, **options)


def edit_error(
    client: openai.OpenAI, path: Path, model: str = "crystal-upscaler", **options: Any
) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        edit(client, path, model, **options)
    return caught.value


def metadata(raw: Any) -> dict[str, Any]:
    return raw.http_response.json()["metadata"]


def image_at(url: str) -> tuple[Image.Image, str]:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content)), response.headers["content-type"]


def nearest(scale: int) -> Image.Image:
    """What the fake upstreams make of the input picture."""
    return pattern(64, 48).resize((64 * scale, 48 * scale), Image.Resampling.NEAREST)


def wait_until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# --- fal: the queue protocol, the request, the result ----------------------------------------


def test_a_remote_model_runs_through_the_whole_fal_queue_cycle(
    client: openai.OpenAI, fal: FakeFal, picture_path: Path
) -> None:
    fal.reset(queued_polls=2, running_polls=2)
    raw = edit(client, picture_path, scale=3)
    result = raw.parse()

    (submit,) = fal.submits
    # The fake's status and result URLs are not derived from the app id: only following them as returned works.
    assert submit.app_id == "clarityai/crystal-upscaler"
    assert submit.polls == 5  # IN_QUEUE twice, IN_PROGRESS twice, then COMPLETED
    assert result.size == "192x144"
    got, content_type = image_at(result.data[0].url)
    assert content_type == "image/png"
    assert got.convert("RGB").tobytes() == nearest(3).tobytes()
    assert raw.headers["x-loupe-provider"] == "fal"
    assert raw.headers["x-loupe-model"] == "crystal-upscaler"


def test_fal_gets_its_key_and_the_request_in_the_apps_own_words(
    client: openai.OpenAI, fal: FakeFal, picture_path: Path
) -> None:
    edit(client, picture_path, scale=2, extra={"creativity": 3, "enable_safety_checker": False})
    edit(client, picture_path, "topaz-image-upscale", scale=1.5, extra={"denoise": 0.25})

    crystal, topaz = fal.submits
    assert crystal.authorization == topaz.authorization == f"Key {FAL_KEY}"
    uploaded = "data:image/png;base64," + base64.b64encode(picture_path.read_bytes()).decode()
    assert crystal.input == {"image_url": uploaded, "scale_factor": 2, "creativity": 3, "enable_safety_checker": False}
    # Topaz names the scale upscale_factor; its catalog defaults go along.
    assert topaz.app_id == "fal-ai/topaz/upscale/image"
    assert topaz.input == {"image_url": uploaded, "upscale_factor": 1.5, "denoise": 0.25, "output_format": "png"}


def test_a_large_image_reaches_fal_through_its_storage_once_for_all_n(
    fal: FakeFal, picture_path: Path, tmp_path: Path
) -> None:
    picture = picture_path.read_bytes()
    # fal's signed upload host is not fal's own: a public one in life, another loopback server here.
    with loupe(tmp_path, fal_key=FAL_KEY, fal_url=fal.url, fal_storage_url=fal.url,
               fal_upload_threshold_bytes=len(picture) // 2, allow_private_urls=True) as url:
        result = edit(sdk(url), picture_path, scale=2, n=2).parse()
        got, _ = image_at(result.data[1].url)

    (initiate,) = fal.initiates
    assert initiate.authorization == f"Key {FAL_KEY}"
    assert initiate.body["content_type"] == "image/png"
    (upload,) = fal.storage.uploads
    assert (upload.data, upload.authorization) == (picture, None)
    assert [submit.input["image_url"] for submit in fal.submits] == [f"{fal.storage.url}/files/{upload.name}"] * 2
    assert all(submit.authorization == f"Key {FAL_KEY}" for submit in fal.submits)
    assert got.convert("RGB").tobytes() == nearest(2).tobytes()


def test_n_is_three_upstream_calls_and_is_billed_three_times(
    client: openai.OpenAI, fal: FakeFal, picture_path: Path
) -> None:
    raw = edit(client, picture_path, scale=10, n=3)
    result = raw.parse()

    assert len(fal.submits) == 3
    assert len({submit.id for submit in fal.submits}) == 3
    assert len(result.data) == 3
    assert result.size == "640x480"
    price = catalog.find("crystal-upscaler").price
    assert price is not None and price.per_megapixel is not None
    assert metadata(raw) == {
        "model": "crystal-upscaler",
        "executed_model": "fal/clarityai/crystal-upscaler",
        "provider": "fal",
        "provider_name": "fal.ai",
        "cost": pytest.approx(price.per_megapixel * 640 * 480 / 1e6 * 3, abs=1e-6),
        "cost_currency": "USD",
    }


def test_b64_json_and_a_format_fal_does_not_return_are_done_by_loupe(
    client: openai.OpenAI, fal: FakeFal, picture_path: Path
) -> None:
    raw = edit(client, picture_path, scale=2, response_format="b64_json", output_format="webp")
    result = raw.parse()

    assert "output_format" not in fal.submits[0].input and "response_format" not in fal.submits[0].input
    assert result.data[0].url is None
    got = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert got.format == "WEBP"
    assert got.size == (128, 96)
    assert metadata(raw)["provider"] == "fal"


def test_the_alias_of_a_local_model_reaches_its_fal_app_with_the_weights_named(
    client: openai.OpenAI, fal: FakeFal, picture_path: Path
) -> None:
    raw = edit(client, picture_path, "real-esrgan", scale=2)

    assert fal.submits[0].app_id == "fal-ai/esrgan"
    assert fal.submits[0].input["scale"] == 2
    assert fal.submits[0].input["model"] == "RealESRGAN_x4plus"
    assert metadata(raw)["model"] == "real-esrgan"
    assert metadata(raw)["cost"] == pytest.approx(0.002)


def test_a_dry_run_prices_a_fal_model_without_calling_fal(
    client: openai.OpenAI, fal: FakeFal, picture_path: Path
) -> None:
    raw = edit(client, picture_path, scale=25, n=2, extra_query={"dryRun": "true"})
    body = raw.http_response.json()

    assert fal.submits == []
    megapixels = 1600 * 1200 / 1e6 * 2
    assert body["estimated"] is True
    assert body["provider"] == "fal"
    assert body["currency"] == "USD"
    assert body["size"] == "1600x1200"
    assert body["total_cost_micros"] == round(0.016 * megapixels * 1e6)
    assert body["components"] == [{"type": "output", "metric": "megapixel", "quantity": pytest.approx(megapixels),
                                   "billable_quantity": pytest.approx(megapixels), "unit_price": 0.016,
                                   "total_cost": round(0.016 * megapixels * 1e6)}]


# --- fal: failures ---------------------------------------------------------------------------


def test_a_fal_422_reaches_the_client_with_its_message(client: openai.OpenAI, fal: FakeFal, picture_path: Path) -> None:
    fal.reset(submit_error=(422, {"detail": [{"loc": ["body", "creativity"], "type": "less_than_equal",
                                              "msg": "Input should be less than or equal to 10"}]}))
    error = edit_error(client, picture_path, extra={"creativity": 7})

    assert error.status_code == 422
    assert error.body == {
        "message": "fal.ai rejected the request: creativity: Input should be less than or equal to 10",
        "type": "invalid_request_error",
        "param": "creativity",
        "code": "INVALID_REQUEST",
    }
    assert error.response.headers["x-should-retry"] == "false"


def test_a_fal_500_is_a_502_that_may_be_retried(client: openai.OpenAI, fal: FakeFal, picture_path: Path) -> None:
    fal.reset(submit_error=(500, {"detail": "runner crashed"}))
    error = edit_error(client, picture_path)

    assert error.status_code == 502
    assert error.code == "UPSTREAM_ERROR"
    assert "runner crashed" in error.body["message"]
    assert error.response.headers.get("x-should-retry") != "false"


def test_a_hung_fal_request_is_a_504_and_is_cancelled_upstream(
    fal: FakeFal, picture_path: Path, tmp_path: Path
) -> None:
    fal.reset(never_finish=True)
    # The fake never finishes, so the deadline is surely hit; 5 s leaves the upload and submit ample time first,
    # and the SDK's own 30 s timeout would end in no answer at all, not a 504.
    with loupe(tmp_path, fal_key=FAL_KEY, fal_url=fal.url, remote_timeout_s=5) as url:
        error = edit_error(sdk(url), picture_path)

    assert error.status_code == 504
    assert "LOUPE_REMOTE_TIMEOUT_S" in error.body["message"]
    assert len(fal.submits) == 1
    assert fal.cancelled == [fal.submits[0].id]


def test_a_dead_fal_port_is_a_quick_502(picture_path: Path, tmp_path: Path) -> None:
    with loupe(tmp_path, fal_key=FAL_KEY, fal_url=f"http://127.0.0.1:{free_port()}") as url:
        started = time.monotonic()
        error = edit_error(sdk(url), picture_path)

    assert error.status_code == 502
    assert error.code == "UPSTREAM_ERROR"
    assert "fal.ai is unreachable" in error.body["message"]
    assert time.monotonic() - started < 25  # a slow machine can't miss it; retries with backoff would

    # Quick because it is tried once: a fal that takes the connection and hangs up sees exactly one.
    with hanging_up_port() as (fal_url, taken), \
            loupe(tmp_path / "hangs-up", fal_key=FAL_KEY, fal_url=fal_url) as url:
        error = edit_error(sdk(url), picture_path)
        assert (error.status_code, error.code) == (502, "UPSTREAM_ERROR")
        assert "fal.ai is unreachable" in error.body["message"]
        assert taken == [1]


def test_credentials_fal_refuses_are_the_servers_fault_and_the_sdk_does_not_retry_them(
    fal: FakeFal, picture_path: Path, tmp_path: Path
) -> None:
    with loupe(tmp_path, fal_key="wrong-key-id:wrong-secret-0000", fal_url=fal.url) as url:
        error = edit_error(sdk(url, max_retries=2), picture_path)

    assert (error.status_code, error.code) == (502, "UPSTREAM_AUTH")
    assert "LOUPE_FAL_KEY" in error.body["message"]
    assert "wrong-secret" not in error.body["message"]
    assert error.response.headers["x-should-retry"] == "false"
    assert len(fal.submits) == 1  # a 502, yet the SDK's two retries did not run


def test_a_client_that_hangs_up_cancels_the_fal_request(remote_loupe: str, fal: FakeFal, picture_path: Path) -> None:
    fal.reset(never_finish=True, queued_polls=1)
    request = httpx.Request("POST", f"{remote_loupe}/v1/images/edits", data={"model": "crystal-upscaler"},
                            files={"image": ("in.png", picture_path.read_bytes(), "image/png")})
    body = request.read()
    head = (f"POST /v1/images/edits HTTP/1.1\r\nHost: {request.url.netloc.decode()}\r\n"
            f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection((request.url.host, request.url.port)) as connection:
        connection.sendall(head.encode() + body)
        wait_until(lambda: bool(fal.submits) and fal.submits[0].polls >= 2)  # fal has answered IN_PROGRESS
        assert fal.cancelled == []

    wait_until(lambda: fal.cancelled == [fal.submits[0].id], timeout_s=60)
    assert len(fal.submits) == 1


# --- secrets ---------------------------------------------------------------------------------


def test_no_key_reaches_a_response_or_a_log_line(
    remote_loupe: str, client: openai.OpenAI, fal: FakeFal, gateway: FakeGateway, picture_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    responses: list[httpx.Response] = [
        edit(client, picture_path).http_response,
        edit(client, picture_path, "some-vendor-upscaler").http_response,
        edit(client, picture_path, extra_query={"dryRun": "true"}).http_response,
    ]
    # Upstreams that echo the key back in their errors.
    fal.reset(submit_error=(422, {"detail": [{"loc": ["body", "image_url"], "msg": f"bad image for key {FAL_KEY}"}]}))
    rejected = edit_error(client, picture_path)
    fal.reset(result_error=(500, {"detail": f"crash; Authorization: Key {FAL_KEY}"}))
    crashed = edit_error(client, picture_path)
    gateway.reset(error=(400, {"error": {"message": f"bad request from {GATEWAY_KEY}", "param": "image"}}))
    refused = edit_error(client, picture_path, "some-vendor-upscaler")
    responses += [error.response for error in (rejected, crashed, refused)]
    responses += [httpx.get(f"{remote_loupe}{path}", timeout=10)
                  for path in ("/v1/models", "/v1/models/crystal-upscaler", "/metrics", "/readyz")]

    assert rejected.body["message"] == "fal.ai rejected the request: image_url: bad image for key [REDACTED]"
    seen = [f"{response.headers}\n{response.text}" for response in responses]
    text = "\n".join([*seen, caplog.text, *(str(record.args) for record in caplog.records)])
    for secret in SECRETS:
        assert secret not in text


# --- no provider -----------------------------------------------------------------------------


def test_a_remote_model_without_any_provider_is_a_clear_503(picture_path: Path, tmp_path: Path) -> None:
    with loupe(tmp_path) as url:
        error = edit_error(sdk(url), picture_path)
        unknown = edit_error(sdk(url), picture_path, "some-vendor-upscaler")

    assert (error.status_code, error.code, error.param) == (503, "PROVIDER_NOT_CONFIGURED", "model")
    assert "LOUPE_FAL_KEY" in error.body["message"] and "LOUPE_GATEWAY_URL" in error.body["message"]
    assert error.response.headers["x-should-retry"] == "false"
    assert (unknown.status_code, unknown.code, unknown.param) == (404, "MODEL_NOT_FOUND", "model")


def test_a_gateway_only_model_with_only_fal_configured_names_the_gateway_setting(
    fal: FakeFal, picture_path: Path, tmp_path: Path
) -> None:
    with loupe(tmp_path, fal_key=FAL_KEY, fal_url=fal.url) as url:
        error = edit_error(sdk(url), picture_path, "google-upscaler")

    assert (error.status_code, error.code) == (503, "PROVIDER_NOT_CONFIGURED")
    assert "LOUPE_GATEWAY_URL" in error.body["message"]
    assert "LOUPE_FAL_KEY" not in error.body["message"]
    assert fal.submits == []


# --- the gateway -----------------------------------------------------------------------------


def test_a_model_missing_from_the_catalog_goes_to_the_gateway_unchanged(
    client: openai.OpenAI, fal: FakeFal, gateway: FakeGateway, picture_path: Path
) -> None:
    raw = edit(client, picture_path, "some-vendor-upscaler", scale=None, extra={"creativity": 0.4})
    result = raw.parse()

    (call,) = gateway.calls
    assert call.authorization == f"Bearer {GATEWAY_KEY}"
    assert call.fields["model"] == "some-vendor-upscaler"
    assert call.fields["creativity"] == "0.4"
    assert call.image == picture_path.read_bytes()
    assert fal.submits == []
    assert result.size == "128x96"  # the gateway's default scale of 2
    assert metadata(raw) == {"model": "some-vendor-upscaler", "executed_model": "fal/clarityai/crystal-upscaler",
                             "provider": "gateway", "provider_name": "gateway", "cost": 0.016, "cost_currency": "USD"}
    got, _ = image_at(result.data[0].url)
    assert got.convert("RGB").tobytes() == nearest(2).tobytes()


def test_google_upscaler_goes_only_to_the_gateway(
    client: openai.OpenAI, fal: FakeFal, gateway: FakeGateway, picture_path: Path
) -> None:
    raw = edit(client, picture_path, "google-upscaler", scale=4, n=2, output_format="jpeg")
    result = raw.parse()
    refused = edit_error(client, picture_path, "google-upscaler", scale=3)

    assert fal.submits == []
    assert len(gateway.calls) == 1  # n goes upstream in one call; the refused scale never left Loupe
    assert gateway.calls[0].fields["n"] == "2"
    assert len(result.data) == 2
    got, content_type = image_at(result.data[1].url)
    assert (got.format, got.size, content_type) == ("JPEG", (256, 192), "image/jpeg")
    assert raw.headers["x-loupe-provider"] == "gateway"
    assert (refused.status_code, refused.param) == (400, "scale_factor")
    assert "2 or 4" in refused.body["message"]


def test_a_dry_run_on_the_gateway_returns_its_cost_fields(
    client: openai.OpenAI, gateway: FakeGateway, picture_path: Path
) -> None:
    raw = edit(client, picture_path, "google-upscaler", scale=2, n=3, extra_query={"dryRun": "true"})
    body = raw.http_response.json()

    assert gateway.calls[0].query == {"dryRun": "true"}
    assert {key: body[key] for key in ("estimated", "model", "provider", "total_cost_micros", "currency", "size")} == {
        "estimated": True, "model": "google-upscaler", "provider": "gateway", "total_cost_micros": 48000,
        "currency": "USD", "size": "128x96",
    }
    assert body["components"][0]["total_cost"] == 48000
    assert body["plan"]["route"] == "gateway"


@pytest.mark.parametrize(
    ("upstream", "status", "code", "no_retry"),
    [
        ((400, {"error": {"message": "image is too small for this model", "param": "image",
                          "code": "INVALID_REQUEST"}}), 400, "INVALID_REQUEST", True),
        ((429, {"error": {"message": "slow down", "code": "RATE_LIMITED"}}), 429, "RATE_LIMITED", False),
        ((500, {"error": {"message": "provider exploded"}}), 502, "UPSTREAM_ERROR", False),
        ((504, {"error": {"message": "provider took too long"}}), 504, "UPSTREAM_TIMEOUT", False),
    ],
)
def test_gateway_errors_reach_the_client_in_the_openai_shape(
    client: openai.OpenAI, gateway: FakeGateway, picture_path: Path,
    upstream: tuple[int, Any], status: int, code: str, no_retry: bool,
) -> None:
    gateway.reset(error=upstream)
    error = edit_error(client, picture_path, "some-vendor-upscaler")

    assert (error.status_code, error.code) == (status, code)
    assert upstream[1]["error"]["message"] in error.body["message"]
    assert (error.response.headers.get("x-should-retry") == "false") is no_retry
    if status == 400:
        assert error.param == "image"


def test_remote_results_larger_than_the_input_limit_are_still_converted(
    fal: FakeFal, picture_path: Path, tmp_path: Path
) -> None:
    # Loupe converts pictures as large as it takes in or makes itself: here 100x100 pixels.
    with loupe(tmp_path, fal_key=FAL_KEY, fal_url=fal.url, max_input_pixels=5000, max_output_side=100) as url:
        client = sdk(url)
        converted = edit(client, picture_path, scale=1.5, output_format="webp").parse()  # 96x72, over 5000 pixels
        as_made = edit(client, picture_path, scale=4).parse()  # 256x192, kept as fal made it
        too_large = edit_error(client, picture_path, scale=4, output_format="webp")
        (webp, content_type), (png, _) = image_at(converted.data[0].url), image_at(as_made.data[0].url)

    assert (webp.format, webp.size, content_type) == ("WEBP", (96, 72), "image/webp")
    assert (png.format, png.size) == ("PNG", (256, 192))
    assert (too_large.status_code, too_large.param) == (400, "output_format")
    assert "output_format=png" in too_large.body["message"]
    assert too_large.response.headers["x-should-retry"] == "false"
