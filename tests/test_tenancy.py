"""With LOUPE_API_KEYS, each key is a tenant of its own: webhook secrets, request ids, records and progress.

Against a real `loupe serve` with two keys, across a restart: no key reads, signs, watches, cancels or even
learns of another key's requests.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.processes import loupe_env, loupe_serve, png, poll
from tests.servers import serve
from tests.test_requests import Receiver

KEY_A, KEY_B = "tenant-a-0123456789abcdef", "tenant-b-0123456789abcdef"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
SHARED_ID = "shared-request-0001"
MODEL = "realesr-animevideov3"


def _slow_png() -> bytes:
    """480² at 4x in 32-px tiles: hundreds of tiles, many seconds on a CPU, so it is still running when looked at."""
    return png((480, 480), (10, 200, 90))


def _status(client: httpx.Client, request_id: str, key: dict[str, str]) -> str | None:
    answer = client.get(f"/v1/requests/{request_id}", headers=key)
    return answer.json()["status"] if answer.status_code == 200 else None


def _first_event(url: str, request_id: str, key: dict[str, str]) -> dict[str, Any]:
    with httpx.stream("GET", f"{url}/v1/progress/{request_id}", headers=key, timeout=60) as stream:
        assert stream.status_code == 200
        return json.loads(next(stream.iter_lines()).removeprefix("data: "))


@pytest.mark.slow
def test_keys_share_nothing_of_requests_or_webhooks_even_after_a_restart(tmp_path: Path, weights_dir: Path) -> None:
    receiver = Receiver()
    env = loupe_env(weights_dir, tmp_path / "data", api_keys=f"{KEY_A},{KEY_B}", tile_size=32,
                    allow_private_urls="true", webhook_retry_s="0.2")
    with serve(receiver.app) as receiver_url:
        with loupe_serve(env, tmp_path / "first.log") as served, httpx.Client(base_url=served.url, timeout=60) as client:
            secret_a = client.get("/v1/webhooks/secret", headers=A).json()["secret"]
            secret_b = client.get("/v1/webhooks/secret", headers=B).json()["secret"]
            assert secret_a != secret_b and secret_a.startswith("whsec_") and secret_b.startswith("whsec_")

            accepted = client.post("/v1/images/edits", headers={**A, "X-Request-Id": SHARED_ID},
                                   data={"model": MODEL, "scale_factor": "4", "output_format": "jpeg",
                                         "webhook_url": f"{receiver_url}/hook"},
                                   files={"image": ("slow.png", _slow_png())})
            assert accepted.status_code == 202, accepted.text
            poll(lambda: _status(client, SHARED_ID, A) == "processing", "A's job to run")

            # B: the id means nothing to it, and using it touches nothing of A's.
            assert client.get(f"/v1/requests/{SHARED_ID}", headers=B).status_code == 404
            assert client.delete(f"/v1/requests/{SHARED_ID}", headers=B).status_code == 404
            assert _first_event(served.url, SHARED_ID, B) == {"stage": "waiting", "done": 0, "total": 0}
            planned = client.post("/v1/images/edits?dryRun=true", headers={**B, "X-Request-Id": SHARED_ID},
                                  data={"model": MODEL, "scale_factor": "2"}, files={"image": ("small.png", png())})
            assert planned.status_code == 200, planned.text
            refused = client.post("/v1/images/edits", headers={**B, "X-Request-Id": SHARED_ID},
                                  data={"model": "no-such-model"}, files={"image": ("small.png", png())})
            assert refused.status_code == 404  # B's own refusal, not a 409 that would tell it the id is taken
            assert client.get(f"/v1/requests/{SHARED_ID}", headers=B).json()["error"]["code"] == "MODEL_NOT_FOUND"
            # A: its job runs on, watched by A alone; A's own second use of the id is refused while it runs.
            assert _status(client, SHARED_ID, A) == "processing"
            assert _first_event(served.url, SHARED_ID, A)["stage"] in ("queued", "running", "encoding")
            again = client.post("/v1/images/edits", headers={**A, "X-Request-Id": SHARED_ID},
                                data={"model": MODEL}, files={"image": ("small.png", png())})
            assert (again.status_code, again.json()["error"]["code"]) == (409, "REQUEST_ID_IN_USE")
            assert served.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # a clean stop: the job waits for the restart

        with loupe_serve(env, tmp_path / "second.log") as served, httpx.Client(base_url=served.url, timeout=60) as client:
            # Resumed: still A's alone, its progress included.
            assert client.get(f"/v1/requests/{SHARED_ID}", headers=A).json()["status"] in ("pending", "processing")
            assert client.get(f"/v1/requests/{SHARED_ID}", headers=B).json()["status"] == "failed"  # B's own
            assert _first_event(served.url, SHARED_ID, B) == {"stage": "waiting", "done": 0, "total": 0}
            poll(lambda: _status(client, SHARED_ID, A) == "completed", "A's resumed job to complete", timeout=300)
            receiver.wait_for(1, timeout=60)

    headers, body, _ = receiver.calls[0]
    assert json.loads(body)["id"] == SHARED_ID
    Webhook(secret_a).verify(body, headers)  # A's receiver accepts A's delivery...
    with pytest.raises(WebhookVerificationError):
        Webhook(secret_b).verify(body, headers)  # ...which B's secret can't verify,
    forged = {**headers, "webhook-signature": Webhook(secret_b).sign(headers["webhook-id"], _sent_at(headers), body)}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret_a).verify(body, forged)  # ...nor sign so that A's receiver takes it.


def _sent_at(headers: dict[str, str]) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(int(headers["webhook-timestamp"]), tz=datetime.timezone.utc)


def test_a_key_shorter_than_16_characters_stops_the_start_up(tmp_path: Path, weights_dir: Path) -> None:
    from tests.processes import run_loupe

    started = run_loupe("serve", "--port", "1", env=loupe_env(weights_dir, tmp_path / "data",
                                                              api_keys="long-enough-key-0001,short"))
    assert started.returncode == 2
    assert started.stderr.strip().splitlines() == [
        "loupe: LOUPE_API_KEYS: each key must be at least 16 characters; key number 2 is shorter"]
    assert "short" not in started.stderr.replace("shorter", "")  # the key itself is never echoed
