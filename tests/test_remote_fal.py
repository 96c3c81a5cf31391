"""The fal.ai provider against a fake fal queue served on 127.0.0.1: protocol, normalization, errors, breaker."""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from server import catalog
from server.config import Settings
from server.api.errors import error_response, retryable, status_of
from server.errors import LoupeError, UpstreamFailed, UpstreamRejected, UpstreamTimeout
from server.jobs import Job
from server.remote import RemoteProviders, RemoteResult
from server.remote.breaker import CircuitBreaker
from server.outbound import Outbound
from server.remote.fal import FalProvider
from tests.fake_upstreams import FAL_KEY, FakeFal, encoded, make_job, pattern
from tests.servers import free_port, hanging_up_port


def settings_for(fal_url: str, **overrides: Any) -> Settings:
    return Settings.model_validate({
        "fal_key": FAL_KEY, "fal_url": fal_url, "fal_storage_url": fal_url, "gateway_url": None,
        "remote_timeout_s": 10, **overrides,
    })


async def _upscale(settings: Settings, job: Job) -> RemoteResult:
    providers = RemoteProviders(settings)
    try:
        provider = providers.route(job.entry, job.requested_model)
        assert provider is not None and provider.name == "fal"
        return await provider.upscale(job)
    finally:
        await providers.aclose()


def upscale(settings: Settings, job: Job) -> RemoteResult:
    return asyncio.run(_upscale(settings, job))


def upscale_error(settings: Settings, job: Job) -> LoupeError:
    with pytest.raises(LoupeError) as caught:
        upscale(settings, job)
    return caught.value


def pixels(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_queue_cycle_follows_the_returned_urls_to_the_upscaled_image(fal: FakeFal) -> None:
    fal.reset(queued_polls=2, running_polls=2)
    job = make_job("crystal-upscaler", scale=2.5)

    result = upscale(settings_for(fal.url), job)

    [submitted] = fal.submits
    assert submitted.app_id == "clarityai/crystal-upscaler"
    assert submitted.authorization == f"Key {FAL_KEY}"
    assert submitted.polls == 5  # IN_QUEUE twice, IN_PROGRESS twice, then COMPLETED
    [image] = result.images
    expected = pattern().resize((40, 30), Image.Resampling.NEAREST)
    assert pixels(image.data).tobytes() == expected.tobytes()
    assert image.content_type == "image/png"
    assert (result.provider, result.provider_name) == ("fal", "fal.ai")
    assert result.executed_model == "fal/clarityai/crystal-upscaler"
    assert result.cost == pytest.approx(0.016 * 40 * 30 / 1_000_000, abs=1e-6)  # USD, to the micro-dollar


@pytest.mark.parametrize(
    ("model", "scale", "extra", "prompt", "seed", "expected", "absent"),
    [
        (
            "topaz-image-upscale", 1.5,
            {"face_enhancement_strength": "0.5", "face_enhancement": "false", "subject_detection": "Foreground",
             "crop_to_fill": "true"},
            "ignored by topaz", None,
            {"upscale_factor": 1.5, "output_format": "png", "face_enhancement_strength": 0.5,
             "face_enhancement": False, "subject_detection": "Foreground", "crop_to_fill": True},
            {"scale_factor", "prompt", "seed", "n"},
        ),
        (
            "clarity-upscaler", 2, {"creativity": "0.4", "resemblance": "1.5", "num_inference_steps": "18",
                                    "enable_safety_checker": "false"},
            "a sharp photo", 42,
            {"upscale_factor": 2, "creativity": 0.4, "resemblance": 1.5, "num_inference_steps": 18,
             "enable_safety_checker": False, "prompt": "a sharp photo", "seed": 42},
            {"scale_factor"},
        ),
        (
            "flux-vision-upscaler", 3, {"guidance_scale": "2.5", "num_inference_steps": "30"}, None, None,
            {"upscale_factor": 3, "guidance": 2.5, "steps": 30},
            {"guidance_scale", "num_inference_steps"},
        ),
        (
            "realesrgan-x4plus-anime", 4, {"face": "true", "tile": "256"}, None, None,
            {"scale": 4, "model": "RealESRGAN_x4plus_anime_6B", "face": True, "tile": 256},
            {"upscale_factor", "scale_factor"},
        ),
        (
            "crystal-upscaler", 150, {"creativity": "7"}, None, None,
            {"scale_factor": 150, "creativity": 7},
            {"upscale_factor", "prompt"},
        ),
        (
            "aura-sr", 4, {"overlapping_tiles": "true"}, None, None,
            {"checkpoint": "v2", "overlapping_tiles": True},
            {"upscale_factor", "upscaling_factor", "scale"},
        ),
    ],
)
def test_the_json_body_is_in_the_apps_own_words(
    fal: FakeFal, model: str, scale: float, extra: dict[str, str], prompt: str | None, seed: int | None,
    expected: dict[str, Any], absent: set[str],
) -> None:
    job = make_job(model, scale=scale, extra=extra, prompt=prompt, seed=seed, image=encoded(pattern(4, 3)))
    upscale(settings_for(fal.url), job)

    [submitted] = fal.submits
    sent = dict(submitted.input)
    image_url = sent.pop("image_url")
    assert image_url == "data:image/png;base64," + base64.b64encode(job.image.data).decode()
    assert sent == expected
    assert not absent & sent.keys()


def test_an_app_that_takes_only_png_gets_a_png_data_uri(fal: FakeFal) -> None:
    job = make_job("recraft-crisp-upscale", scale=4, image=encoded(pattern(), "JPEG"))
    upscale(settings_for(fal.url), job)

    image_url = fal.submits[0].input["image_url"]
    assert image_url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(image_url.partition(",")[2]))).format == "PNG"


def test_n_is_emulated_by_parallel_submits_with_distinct_seeds(fal: FakeFal) -> None:
    job = make_job("clarity-upscaler", scale=2, n=3, seed=10)
    result = upscale(settings_for(fal.url), job)

    assert len(fal.submits) == 3
    assert sorted(request.input["seed"] for request in fal.submits) == [10, 11, 12]
    assert [pixels(image.data).size for image in result.images] == [(32, 24)] * 3
    assert result.cost == pytest.approx(3 * catalog.find("clarity-upscaler").price.cost(32 * 24))


def test_a_large_image_goes_through_fal_storage_and_only_the_storage_api_sees_the_key(fal: FakeFal) -> None:
    job = make_job("crystal-upscaler", scale=2, image=encoded(pattern(64, 48)))
    # The signed upload host is another server than fal's own, as fal's is: a "public" one, here on loopback.
    result = upscale(settings_for(fal.url, fal_upload_threshold_bytes=len(job.image.data) - 1,
                                  allow_private_urls=True), job)

    [initiate] = fal.initiates
    assert initiate.authorization == f"Key {FAL_KEY}"
    assert initiate.query == {"storage_type": "fal-cdn-v3"}
    assert initiate.body == {"file_name": "req-test.png", "content_type": "image/png"}
    [upload] = fal.storage.uploads
    assert (upload.data, upload.content_type, upload.authorization) == (job.image.data, "image/png", None)
    [submitted] = fal.submits
    assert submitted.input["image_url"] == f"{fal.storage.url}/files/{upload.name}"
    expected = pattern(64, 48).resize((128, 96), Image.Resampling.NEAREST)
    assert pixels(result.images[0].data).tobytes() == expected.tobytes()


def test_an_image_up_to_the_threshold_still_travels_as_a_data_uri(fal: FakeFal) -> None:
    job = make_job("crystal-upscaler", scale=2, image=encoded(pattern(64, 48)))
    upscale(settings_for(fal.url, fal_upload_threshold_bytes=len(job.image.data)), job)

    assert fal.initiates == [] and fal.storage.uploads == []
    assert fal.submits[0].input["image_url"] == "data:image/png;base64," + base64.b64encode(job.image.data).decode()


def test_the_upload_is_what_the_app_takes_after_re_encoding(fal: FakeFal) -> None:
    job = make_job("recraft-crisp-upscale", image=encoded(pattern(64, 48), "JPEG"))
    upscale(settings_for(fal.url, fal_upload_threshold_bytes=0, allow_private_urls=True), job)

    assert fal.initiates[0].body == {"file_name": "req-test.png", "content_type": "image/png"}
    [upload] = fal.storage.uploads
    assert upload.content_type == "image/png"
    assert Image.open(io.BytesIO(upload.data)).format == "PNG"


def test_n_calls_share_one_upload(fal: FakeFal) -> None:
    job = make_job("clarity-upscaler", scale=2, n=3, seed=10)
    result = upscale(settings_for(fal.url, fal_upload_threshold_bytes=0, allow_private_urls=True), job)

    assert len(fal.initiates) == len(fal.storage.uploads) == 1
    assert {request.input["image_url"] for request in fal.submits} == {f"{fal.storage.url}/files/1-req-test.png"}
    assert len(result.images) == 3


@pytest.mark.parametrize(
    ("behaviour", "status", "code", "words"),
    [
        ({"initiate_error": (500, {"detail": f"storage full; Authorization: Key {FAL_KEY}"})}, 502, "UPSTREAM_ERROR",
         "storage full"),
        ({"initiate_error": (413, {"detail": "file too large"})}, 502, "UPSTREAM_ERROR", "file too large"),
        ({"initiate_error": (401, {"detail": f"bad key {FAL_KEY}"})}, 502, "UPSTREAM_AUTH", "LOUPE_FAL_KEY"),
        ({"initiate_error": (504, {"detail": "Gateway Timeout"})}, 504, "UPSTREAM_TIMEOUT", "timed out"),
        ({"upload_error": 503}, 502, "UPSTREAM_ERROR", "HTTP 503"),
    ],
)
def test_a_failing_storage_is_a_502_or_504_without_the_key_and_nothing_is_submitted(
    fal: FakeFal, caplog: pytest.LogCaptureFixture, behaviour: dict[str, Any], status: int, code: str, words: str
) -> None:
    caplog.set_level(logging.DEBUG)
    fal.reset(**behaviour)
    error = upscale_error(settings_for(fal.url, fal_upload_threshold_bytes=0, allow_private_urls=True),
                          make_job("crystal-upscaler", scale=2))

    assert (status_of(error), error.code) == (status, code)
    assert words in error.message
    assert_no_key(error, caplog)
    assert len(fal.initiates) == 1  # never retried blindly
    assert fal.submits == []


def test_an_upload_url_at_an_internal_address_gets_nothing(fal: FakeFal) -> None:
    """fal's storage API is the operator's configured host; the upload URL it answers is not, so it must be
    public: here it is another loopback server, which the outbound policy refuses before sending a byte."""
    error = upscale_error(settings_for(fal.url, fal_upload_threshold_bytes=0), make_job("crystal-upscaler", scale=2))

    assert (status_of(error), error.code, retryable(error)) == (502, "UPSTREAM_ERROR", False)
    assert "non-public address (loopback)" in error.message and "127.0.0.1" in error.message
    assert len(fal.initiates) == 1 and fal.storage.uploads == [] and fal.submits == []


@pytest.mark.parametrize("output", ["image", "images", "url-strings", "data-uri"])
def test_every_documented_result_shape_is_read(fal: FakeFal, output: str) -> None:
    fal.reset(output=output)
    result = upscale(settings_for(fal.url), make_job("realesrgan-x4plus", scale=2))
    assert pixels(result.images[0].data).size == (32, 24)


def test_transient_status_failures_are_retried(fal: FakeFal) -> None:
    fal.reset(flaky_status_polls=2)
    result = upscale(settings_for(fal.url), make_job("realesrgan-x4plus", scale=2))
    assert len(result.images) == 1
    assert len(fal.submits) == 1


@pytest.mark.parametrize(
    ("model", "scale", "extra", "param", "words"),
    [
        ("topaz-image-upscale", 6, {}, "scale_factor", "from 1 to 4"),
        ("crystal-upscaler", 250, {}, "scale_factor", "from 1 to 200"),
        ("aura-sr", 2, {}, "scale_factor", "only upscales by 4"),
        ("crystal-upscaler", 2, {"creativity": "12"}, "creativity", "from 0 to 10"),
        ("clarity-upscaler", 2, {"creativity": "lots"}, "creativity", "must be a number"),
        ("crystal-upscaler", 2, {"image_url": "https://example.com/a.png"}, "image_url", "set by Loupe"),
        ("topaz-image-upscale", 2, {"upscale_factor": "3"}, "upscale_factor", "set by Loupe"),
    ],
)
def test_a_request_the_app_cannot_take_is_a_400_before_any_call(
    fal: FakeFal, model: str, scale: float, extra: dict[str, str], param: str, words: str
) -> None:
    error = upscale_error(settings_for(fal.url), make_job(model, scale=scale, extra=extra))
    assert (status_of(error), error.param, retryable(error)) == (400, param, False)
    assert words in error.message
    assert fal.submits == []


def test_a_fixed_scale_app_ignores_the_default_scale(fal: FakeFal) -> None:
    result = upscale(settings_for(fal.url), make_job("recraft-creative-upscale"))
    assert pixels(result.images[0].data).size == (64, 48)
    assert "scale_factor" not in fal.submits[0].input


def test_upstream_422_keeps_its_status_and_message_without_the_key(
    fal: FakeFal, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fal.reset(submit_error=(422, {"detail": [{"loc": ["body", "image_url"], "type": "image_too_large",
                                              "msg": f"image too large for account {FAL_KEY}"}]}))
    error = upscale_error(settings_for(fal.url), make_job("crystal-upscaler", scale=2))

    assert (status_of(error), error.param, retryable(error)) == (422, "image", False)
    assert "image too large" in error.message
    assert_no_key(error, caplog)
    assert len(fal.submits) == 1


def test_a_failed_submit_is_a_502_and_is_never_retried(fal: FakeFal, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fal.reset(submit_error=(500, {"detail": "runner crashed while serving Authorization: Key " + FAL_KEY}))
    error = upscale_error(settings_for(fal.url), make_job("crystal-upscaler", scale=2))

    assert (status_of(error), error.code) == (502, "UPSTREAM_ERROR")
    assert "runner crashed" in error.message
    assert_no_key(error, caplog)
    assert len(fal.submits) == 1


def test_a_model_timeout_reported_by_fal_is_a_504(fal: FakeFal) -> None:
    fal.reset(result_error=(504, {"detail": "Request timed out", "error_type": "request_timeout"}))
    error = upscale_error(settings_for(fal.url), make_job("realesrgan-x4plus", scale=2))
    assert status_of(error) == 504
    assert "Request timed out" in error.message


def test_rejected_credentials_are_the_servers_problem_not_the_clients(fal: FakeFal) -> None:
    settings = settings_for(fal.url, fal_key="wrong-key-0000000000")
    error = upscale_error(settings, make_job("realesrgan-x4plus", scale=2))
    assert (status_of(error), error.code, retryable(error)) == (502, "UPSTREAM_AUTH", False)
    assert "wrong-key" not in error.message


def test_a_hung_request_times_out_as_504_and_is_cancelled_upstream(fal: FakeFal) -> None:
    fal.reset(never_finish=True)
    # The fake never finishes, so the deadline is surely hit; 5 s leaves the submit ample time first.
    started = time.monotonic()
    error = upscale_error(settings_for(fal.url, remote_timeout_s=5.0), make_job("crystal-upscaler", scale=2))

    assert status_of(error) == 504
    assert "LOUPE_REMOTE_TIMEOUT_S" in error.message
    assert time.monotonic() - started < 25  # the deadline ended it, not an endless wait
    assert len(fal.submits) == 1
    assert fal.cancelled == [fal.submits[0].id]


def test_a_dead_provider_is_a_fast_502() -> None:
    started = time.monotonic()
    error = upscale_error(settings_for(f"http://127.0.0.1:{free_port()}"), make_job("crystal-upscaler", scale=2))
    assert (status_of(error), error.code) == (502, "UPSTREAM_ERROR")
    assert "unreachable" in error.message
    assert time.monotonic() - started < 25  # a slow machine can't miss it; retries with backoff would

    # Fast because it is tried once: a provider that takes the connection and hangs up sees exactly one.
    with hanging_up_port() as (url, taken):
        error = upscale_error(settings_for(url), make_job("crystal-upscaler", scale=2))
        assert (status_of(error), error.code) == (502, "UPSTREAM_ERROR")
        assert "unreachable" in error.message
        assert taken == [1]


def test_cancelling_the_caller_cancels_the_fal_request(fal: FakeFal) -> None:
    fal.reset(never_finish=True)

    async def scenario() -> None:
        task = asyncio.ensure_future(_upscale(settings_for(fal.url), make_job("crystal-upscaler", scale=2, n=2)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        # Both images submitted, and each polled: both fal requests are queued when the caller is cancelled.
        while not (len(fal.submits) == 2 and all(request.polls >= 1 for request in fal.submits)):
            assert not task.done(), task
            assert loop.time() < deadline, "the two fal requests were never both submitted and polled"
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert sorted(fal.cancelled) == sorted(request.id for request in fal.submits)
    assert len(fal.submits) == 2


def test_the_breaker_opens_after_repeated_failures_and_answers_503_without_calling(fal: FakeFal) -> None:
    fal.reset(submit_error=(500, {"detail": "boom"}))

    async def scenario() -> list[LoupeError]:
        providers = RemoteProviders(settings_for(fal.url))
        errors = []
        job = make_job("crystal-upscaler", scale=2)
        try:
            for _ in range(6):
                provider = providers.route(job.entry, job.requested_model)
                assert provider is not None
                with pytest.raises(LoupeError) as caught:
                    await provider.upscale(job)
                errors.append(caught.value)
        finally:
            await providers.aclose()
        return errors

    errors = asyncio.run(scenario())
    assert [status_of(error) for error in errors] == [502] * 5 + [503]
    assert errors[-1].retry_after_s >= 1
    assert len(fal.submits) == 5


def test_a_half_open_breaker_lets_one_probe_through_and_closes_on_success(fal: FakeFal) -> None:
    fal.reset(submit_error=(500, {"detail": "boom"}))
    now = [0.0]  # the breaker's clock: it moves only when the test moves it
    breaker = CircuitBreaker("fal.ai", threshold=1, cooldown_s=10, clock=lambda: now[0])
    job = make_job("realesrgan-x4plus", scale=2)

    async def scenario() -> None:
        async with httpx.AsyncClient() as http:
            settings = settings_for(fal.url)
            provider = FalProvider(settings, http, Outbound.of(settings, trust_providers=True), breaker=breaker)
            for status in (502, 503):
                with pytest.raises(LoupeError) as caught:
                    await provider.upscale(job)
                assert status_of(caught.value) == status
            assert not provider.available()
            now[0] += 10  # the cool-down passes
            assert breaker.state == "half-open" and provider.available()
            fal.reset()
            await provider.upscale(job)
            assert breaker.state == "closed"

    asyncio.run(scenario())


def test_breaker_counts_only_provider_failures() -> None:
    now = [0.0]
    breaker = CircuitBreaker("fal.ai", threshold=2, cooldown_s=10, clock=lambda: now[0])

    def outcome(error: Exception | None) -> None:
        try:
            with breaker.call():
                if error is not None:
                    raise error
        except Exception:
            pass

    outcome(UpstreamFailed("down"))
    outcome(UpstreamRejected(422, "bad field"))  # the provider answered: the streak resets
    outcome(UpstreamFailed("down"))
    assert breaker.state == "closed"
    outcome(KeyError("a bug Loupe did not foresee"))  # counts as a failure too
    assert breaker.state == "open"
    with pytest.raises(LoupeError) as caught, breaker.call():
        pass
    assert status_of(caught.value) == 503
    now[0] = 10.0
    assert breaker.state == "half-open"
    outcome(UpstreamTimeout("slow"))  # the probe failed: open again for a full cool-down
    assert breaker.state == "open"


def test_dry_run_prices_the_output_without_calling_fal(fal: FakeFal) -> None:
    async def dry(job: Job) -> dict[str, Any]:
        providers = RemoteProviders(settings_for(fal.url))
        try:
            provider = providers.route(job.entry, job.requested_model)
            assert provider is not None
            return await provider.dry_run(job)
        finally:
            await providers.aclose()

    crystal = asyncio.run(dry(make_job("crystal-upscaler", scale=2, n=2)))
    assert crystal["provider"] == "fal"
    assert crystal["executed_model"] == "fal/clarityai/crystal-upscaler"
    [component] = crystal["components"]
    assert component["metric"] == "megapixel"
    assert component["quantity"] == pytest.approx(2 * 32 * 24 / 1_000_000)
    assert crystal["total_cost_micros"] == round(0.016 * 2 * 32 * 24)

    topaz = asyncio.run(dry(make_job("topaz-image-upscale", scale=2, n=3)))
    assert topaz["components"][0] == {"type": "output", "metric": "image", "quantity": 3,
                                           "billable_quantity": 3, "unit_price": 0.08, "total_cost": 240_000}
    assert topaz["total_cost_micros"] == 240_000

    with pytest.raises(LoupeError) as caught:
        asyncio.run(dry(make_job("topaz-image-upscale", scale=5)))
    assert status_of(caught.value) == 400
    assert fal.submits == []


def assert_no_key(error: LoupeError, caplog: pytest.LogCaptureFixture) -> None:
    for secret in (FAL_KEY, *FAL_KEY.split(":")):
        assert secret not in error.message
        assert secret not in error_response(error).body.decode()
        assert secret not in caplog.text
