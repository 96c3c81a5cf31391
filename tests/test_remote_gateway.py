"""The gateway provider against a fake OpenAI-compatible gateway on 127.0.0.1, and how requests are routed."""
from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import pytest
from PIL import Image

from server import catalog
from server.config import Settings
from server.api.errors import error_response, retryable, status_of
from server.errors import LoupeError
from server.jobs import Job
from server.remote import RemoteProviders, RemoteResult
from tests.fake_upstreams import FAL_KEY, GATEWAY_KEY, FakeGateway, encoded, make_job, pattern
from tests.servers import free_port


def settings_for(gateway_url: str | None, **overrides: Any) -> Settings:
    return Settings.model_validate(
        {"fal_key": None, "gateway_url": gateway_url, "gateway_key": GATEWAY_KEY, "remote_timeout_s": 10, **overrides}
    )


async def _call(settings: Settings, job: Job, *, dry_run: bool = False) -> Any:
    providers = RemoteProviders(settings)
    try:
        provider = providers.route(job.entry, job.requested_model)
        assert provider is not None and provider.name == "gateway"
        return await (provider.dry_run(job) if dry_run else provider.upscale(job))
    finally:
        await providers.aclose()


def upscale(settings: Settings, job: Job) -> RemoteResult:
    return asyncio.run(_call(settings, job))


def upscale_error(settings: Settings, job: Job) -> LoupeError:
    with pytest.raises(LoupeError) as caught:
        upscale(settings, job)
    return caught.value


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_the_job_is_forwarded_as_multipart_with_the_model_id_unchanged(gateway: FakeGateway) -> None:
    job = make_job("acme-upscaler-v9", scale=2, prompt="keep the grain", seed=5,
                   extra={"creativity": "0.4", "style": "film"})
    result = upscale(settings_for(f"{gateway.url}/v1"), job)

    [call] = gateway.calls
    assert call.authorization == f"Bearer {GATEWAY_KEY}"
    assert call.query == {}
    assert call.fields == {"model": "acme-upscaler-v9", "scale_factor": "2", "n": "1", "response_format": "b64_json",
                           "prompt": "keep the grain", "seed": "5", "creativity": "0.4", "style": "film"}
    assert (call.image, call.filename, call.content_type) == (job.image.data, "in.png", "image/png")
    [image] = result.images
    assert size_of(image.data) == (32, 24)
    assert (result.provider, result.executed_model, result.cost) == ("gateway", "fal/clarityai/crystal-upscaler", 0.016)


def test_n_goes_upstream_in_one_call(gateway: FakeGateway) -> None:
    result = upscale(settings_for(f"{gateway.url}/v1"), make_job("crystal-upscaler", scale=1.5, n=3))
    assert len(gateway.calls) == 1
    assert gateway.calls[0].fields["n"] == "3"
    assert [size_of(image.data) for image in result.images] == [(24, 18)] * 3


def test_url_results_are_fetched_with_the_key_only_from_the_gateways_own_host(gateway: FakeGateway) -> None:
    gateway.reset(output="url")
    result = upscale(settings_for(f"{gateway.url}/v1"), make_job("google-upscaler", scale=4))
    assert size_of(result.images[0].data) == (64, 48)


def test_dry_run_is_forwarded_and_reports_the_gateways_cost(gateway: FakeGateway) -> None:
    planned = asyncio.run(_call(settings_for(f"{gateway.url}/v1"), make_job("crystal-upscaler", scale=2, n=2),
                                dry_run=True))

    [call] = gateway.calls
    assert call.query == {"dryRun": "true"}
    assert planned["provider"] == "gateway"
    assert planned["executed_model"] == "fal/crystal-upscaler"
    assert planned["total_cost_micros"] == 32000
    assert planned["components"][0]["unit_price"] == 0.016


def test_a_scale_the_model_cannot_take_is_a_400_before_any_call(gateway: FakeGateway) -> None:
    error = upscale_error(settings_for(f"{gateway.url}/v1"), make_job("google-upscaler", scale=3))
    assert (status_of(error), error.param) == (400, "scale_factor")
    assert "2 or 4" in error.message
    assert gateway.calls == []


@pytest.mark.parametrize(
    ("upstream_status", "upstream_error", "status", "code", "param"),
    [
        (404, {"message": "Model 'nope' not found", "type": "invalid_request_error", "code": "MODEL_NOT_FOUND"},
         404, "MODEL_NOT_FOUND", None),
        (400, {"message": "scale_factor must be 2 or 4", "type": "invalid_request_error", "param": "scale_factor",
               "code": "INVALID_REQUEST"}, 400, "INVALID_REQUEST", "scale_factor"),
        (429, {"message": "slow down", "type": "rate_limit_error", "code": "RATE_LIMITED"}, 429, "RATE_LIMITED", None),
        (402, {"message": "Insufficient balance", "type": "billing_error", "code": "INSUFFICIENT_BALANCE"},
         502, "UPSTREAM_ERROR", None),
        (502, {"message": "every provider failed", "type": "server_error", "code": "ALL_PROVIDERS_EXHAUSTED"},
         502, "ALL_PROVIDERS_EXHAUSTED", None),
        (504, {"message": "provider timed out", "type": "server_error", "code": "UPSTREAM_ERROR"},
         504, "UPSTREAM_TIMEOUT", None),
    ],
)
def test_upstream_errors_are_mapped(
    gateway: FakeGateway, upstream_status: int, upstream_error: dict[str, Any], status: int, code: str,
    param: str | None,
) -> None:
    gateway.reset(error=(upstream_status, {"error": upstream_error}))
    error = upscale_error(settings_for(f"{gateway.url}/v1"), make_job("crystal-upscaler", scale=2))
    assert (status_of(error), error.code, error.param) == (status, code, param)
    assert upstream_error["message"] in error.message


def test_rejected_credentials_never_show_the_key(gateway: FakeGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gateway.reset(error=(500, {"error": {"message": f"bad header Bearer {GATEWAY_KEY}", "code": "X"}}))
    error = upscale_error(settings_for(f"{gateway.url}/v1"), make_job("crystal-upscaler", scale=2))
    assert status_of(error) == 502
    assert "[REDACTED]" in error.message

    wrong = upscale_error(settings_for(f"{gateway.url}/v1", gateway_key="lmnfl_wrong-key-999999"),
                          make_job("crystal-upscaler", scale=2))
    assert (status_of(wrong), wrong.code, retryable(wrong)) == (502, "UPSTREAM_AUTH", False)
    for text in (error.message, error_response(error).body.decode(), wrong.message, caplog.text):
        assert GATEWAY_KEY not in text
        assert "lmnfl_wrong-key-999999" not in text


def test_a_slow_gateway_is_a_504_and_a_dead_one_a_502(gateway: FakeGateway) -> None:
    gateway.reset(delay_s=3)
    slow = upscale_error(settings_for(f"{gateway.url}/v1", remote_timeout_s=1), make_job("crystal-upscaler", scale=2))
    assert status_of(slow) == 504
    dead = upscale_error(settings_for(f"http://127.0.0.1:{free_port()}/v1"), make_job("crystal-upscaler", scale=2))
    assert (status_of(dead), dead.code) == (502, "UPSTREAM_ERROR")


def test_fal_is_preferred_and_the_gateway_takes_what_fal_cannot_run() -> None:
    both = RemoteProviders(settings_for("http://127.0.0.1:9/v1", fal_key=FAL_KEY))
    fal_only = RemoteProviders(settings_for(None, fal_key=FAL_KEY))
    nothing = RemoteProviders(settings_for(None))

    def routed(providers: RemoteProviders, model_id: str) -> str | None:
        provider = providers.route(catalog.find(model_id), model_id)
        return provider.name if provider is not None else None

    assert routed(both, "crystal-upscaler") == "fal"
    assert routed(both, "google-upscaler") == "gateway"
    assert routed(both, "some-model-loupe-never-heard-of") == "gateway"
    assert routed(fal_only, "google-upscaler") is None
    assert routed(fal_only, "some-model-loupe-never-heard-of") is None
    assert routed(nothing, "crystal-upscaler") is None
    for providers in (both, fal_only, nothing):
        asyncio.run(providers.aclose())


def test_an_open_fal_breaker_sends_its_models_to_the_gateway(gateway: FakeGateway) -> None:
    dead_fal = f"http://127.0.0.1:{free_port()}"
    job = make_job("crystal-upscaler", scale=2)

    async def scenario() -> list[str]:
        providers = RemoteProviders(settings_for(f"{gateway.url}/v1", fal_key=FAL_KEY, fal_url=dead_fal))
        served_by = []
        try:
            for _ in range(6):
                provider = providers.route(job.entry, job.requested_model)
                assert provider is not None
                try:
                    await provider.upscale(job)
                except LoupeError as error:
                    assert status_of(error) == 502
                served_by.append(provider.name)
        finally:
            await providers.aclose()
        return served_by

    assert asyncio.run(scenario()) == ["fal"] * 5 + ["gateway"]
    assert len(gateway.calls) == 1


def test_a_non_png_upload_travels_with_its_own_type(gateway: FakeGateway) -> None:
    job = make_job("crystal-upscaler", scale=2, image=encoded(pattern(), "WEBP"))
    upscale(settings_for(f"{gateway.url}/v1"), job)
    assert gateway.calls[0].content_type == "image/webp"
    assert gateway.calls[0].image == job.image.data
