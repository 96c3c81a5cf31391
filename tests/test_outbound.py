"""One outbound HTTP policy for every client Loupe has, each proved on loopback: only the configured providers'
origins are reached whatever their address; any other hop (a redirect, a URL a provider hands back, a download)
must be public unless LOUPE_ALLOW_PRIVATE_URLS; redirects are re-vetted or refused; downloads are capped.

The image fetcher's own cases (every hop vetted, pinned connections, caps, timeouts) are in test_net.py and
fal's upload URL in test_remote_fal.py; webhooks' URL guard at submission in test_requests.py.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from server.app import create_app
from server.engine import weights
from server.engine.weights import WeightsError
from tests.conftest import loupe_settings
from tests.fake_engine import FakeEngine
from tests.processes import loupe_env, png, poll, run_loupe
from tests.servers import serve
from tests.test_requests import submit


class Internal:
    """A service that must never be reached from outside: it counts every request that gets to it."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.app = FastAPI()
        self.app.api_route("/{path:path}", methods=["GET", "POST", "PUT"])(self._any)

    async def _any(self, request: Request, path: str) -> Response:
        self.hits.append(f"{request.method} /{path}")
        return Response(png(), media_type="image/png")


@pytest.fixture(scope="module")
def internal() -> Iterator[tuple[Internal, str]]:
    service = Internal()
    with serve(service.app) as url:
        yield service, url


class Redirector:
    """A host that answers every request with a redirect to `target` (the internal service)."""

    def __init__(self) -> None:
        self.target = ""
        self.app = FastAPI()
        self.app.api_route("/{path:path}", methods=["GET", "POST", "PUT"])(self._redirect)

    async def _redirect(self, path: str) -> Response:
        return RedirectResponse(self.target, status_code=307)


def test_a_webhook_receiver_that_redirects_is_not_followed(tmp_path: Path,
                                                           internal: tuple[Internal, str]) -> None:
    service, internal_url = internal
    redirector = Redirector()
    redirector.target = f"{internal_url}/hook"
    settings = loupe_settings(Path("weights"), tmp_path / "data", allow_private_urls=True, webhook_retry_s=[0.05])
    with serve(redirector.app) as receiver, serve(create_app(settings, FakeEngine)) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        request_id = submit(client, webhook_url=f"{receiver}/hook").json()["id"]
        record = poll(lambda: (body := client.get(f"/v1/requests/{request_id}").json())
                      and len(body["webhook_attempts"]) == 2 and body, "both webhook attempts")
    assert [(a["status_code"], a["delivered"]) for a in record["webhook_attempts"]] == [(307, False)] * 2
    assert service.hits == []


class Gateway:
    """An OpenAI-compatible gateway whose result URL is on its own origin, where it redirects to `target`; or, with
    `redirect_submit`, whose edit endpoint itself redirects there."""

    def __init__(self) -> None:
        self.target = ""
        self.redirect_submit = False
        self.app = FastAPI()
        self.app.post("/v1/images/edits")(self._edit)
        self.app.get("/v1/media/{name}")(self._media)

    async def _edit(self, request: Request) -> Response:
        if self.redirect_submit:
            return RedirectResponse(self.target, status_code=307)
        base = str(request.base_url).rstrip("/")
        return JSONResponse({"created": 1, "size": "64x48", "data": [{"url": f"{base}/v1/media/result.png"}],
                             "metadata": {"model": "acme", "executed_model": "acme", "provider": "x", "cost": 0}})

    async def _media(self, name: str) -> Response:
        return RedirectResponse(self.target, status_code=302)


@pytest.mark.parametrize("redirect_submit", [False, True])
def test_a_provider_cant_send_loupe_to_an_internal_address(tmp_path: Path, internal: tuple[Internal, str],
                                                           redirect_submit: bool) -> None:
    """The gateway is the operator's, so its own origin is reached though it is on loopback; its result image that
    redirects to another loopback service, or its edit endpoint redirecting there, gets Loupe nowhere."""
    service, internal_url = internal
    service.hits.clear()
    gateway = Gateway()
    gateway.target, gateway.redirect_submit = f"{internal_url}/admin/secrets.png", redirect_submit
    with serve(gateway.app) as gateway_url:
        settings = loupe_settings(tmp_path / "no-weights", tmp_path / "data", gateway_url=f"{gateway_url}/v1")
        with serve(create_app(settings, FakeEngine)) as url:
            answer = httpx.post(f"{url}/v1/images/edits", data={"model": "acme-upscaler"},
                                files={"image": ("a.png", png())}, timeout=30)
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["code"] == "UPSTREAM_ERROR"
    if not redirect_submit:
        assert "non-public address (loopback)" in answer.json()["error"]["message"]
        assert answer.headers["x-should-retry"] == "false"
    assert service.hits == []


class Downloads:
    """A host of weight files: `/model.pth` (`size` bytes), and `/moved` redirecting to `target`."""

    def __init__(self) -> None:
        self.size = 1 << 16
        self.target = ""
        self.hits: list[str] = []
        self.app = FastAPI()
        self.app.get("/model.pth")(self._model)
        self.app.get("/moved.pth")(self._moved)

    async def _model(self) -> Response:
        self.hits.append("/model.pth")
        return Response(b"\0" * self.size, media_type="application/octet-stream")

    async def _moved(self) -> Response:
        self.hits.append("/moved.pth")
        return RedirectResponse(self.target, status_code=302)


def test_weights_add_reaches_no_private_address_and_stops_at_the_size_cap(tmp_path: Path,
                                                                          weights_dir: Path) -> None:
    host = Downloads()
    with serve(host.app) as url:
        env = loupe_env(tmp_path / "weights", tmp_path / "data")
        refused = run_loupe("weights", "add", f"{url}/model.pth", env=env)
        assert refused.returncode == 1 and "non-public address (loopback)" in refused.stderr
        assert "LOUPE_ALLOW_PRIVATE_URLS" in refused.stderr and host.hits == []

        host.size = 5 << 20
        capped = run_loupe("weights", "add", f"{url}/model.pth", env={**env, "LOUPE_ALLOW_PRIVATE_URLS": "true",
                                                                      "LOUPE_MAX_WEIGHT_BYTES": str(1 << 20)})
        assert capped.returncode == 1 and "LOUPE_MAX_WEIGHT_BYTES" in capped.stderr, capped.stderr
        custom = tmp_path / "weights" / "custom"
        assert not custom.exists() or not any(custom.iterdir())  # nothing half-downloaded is left


def test_a_weights_mirror_that_redirects_to_an_internal_address_is_refused_at_the_hop(
        tmp_path: Path, internal: tuple[Internal, str]) -> None:
    """A mirror is the operator's own host, so it is reached on loopback; where it redirects is vetted again."""
    service, internal_url = internal
    service.hits.clear()
    mirror = Downloads()
    mirror.target = f"{internal_url}/realesr-animevideov3.pth"
    with serve(mirror.app) as url:
        with pytest.raises(WeightsError, match="non-public address"):
            with weights.downloaded(f"{url}/moved.pth", tmp_path / "model.pth", None, max_bytes=1 << 20,
                                    trusted=url):
                pass
    assert mirror.hits == ["/moved.pth"] and service.hits == []
    assert list(tmp_path.iterdir()) == []
