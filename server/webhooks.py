"""Webhooks: a finished request's object POSTed to its `webhook_url`, signed per Standard Webhooks.

Headers `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">` under a `whsec_` secret (`LOUPE_WEBHOOK_SECRET`, or one generated once and kept in the
data dir). A failed delivery (no answer within the timeout, or not a 2xx) is retried after each delay of
`LOUPE_WEBHOOK_RETRY_S`; every attempt is recorded on the request. The URL passes the image URL guard when
it is submitted and again at every attempt, and redirects are never followed.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from standardwebhooks import Webhook

from server import net
from server.config import Settings, SettingsError
from server.errors import InvalidInput

log = logging.getLogger("loupe.webhooks")

MAX_URL_LENGTH = 2048
_SECRET_FILE = "webhook-secret"
_PREFIX = "whsec_"

Record = Callable[[dict[str, Any]], Awaitable[None]]  # stores one attempt on the request


def load_secret(settings: Settings) -> str:
    """`LOUPE_WEBHOOK_SECRET`, else the data dir's secret, made on first use and readable by its owner only."""
    if settings.webhook_secret is not None:
        _check_secret(settings.webhook_secret, "LOUPE_WEBHOOK_SECRET")
        return settings.webhook_secret
    path = settings.data_dir / _SECRET_FILE
    try:
        return _check_secret(path.read_text().strip(), str(path))
    except FileNotFoundError:
        pass
    secret = _PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _check_secret(path.read_text().strip(), str(path))
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    return secret


def _check_secret(secret: str, where: str) -> str:
    try:
        if not secret.startswith(_PREFIX) or not base64.b64decode(secret[len(_PREFIX):], validate=True):
            raise ValueError
    except ValueError:
        raise SettingsError(f"{where} must be a Standard Webhooks secret: whsec_ followed by base64") from None
    return secret


async def check_url(url: str, settings: Settings) -> str:
    """The `webhook_url` a client gave, if Loupe may call it: http(s), at most 2048 characters, a public host
    (any host with LOUPE_ALLOW_PRIVATE_URLS). InvalidInput on param `webhook_url` otherwise."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput(f"webhook_url is longer than {MAX_URL_LENGTH} characters", "webhook_url")
    parsed = net.parse_url(url, "webhook_url")
    await net.vetted_addresses(parsed, settings, "webhook_url")
    return url


class Deliverer:
    """Sends the webhooks of finished requests, each in a task of its own, so that a slow receiver holds up
    nothing else."""

    def __init__(self, settings: Settings, secret: str) -> None:
        self.settings = settings
        self.signer = Webhook(secret)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def attempts(self) -> int:
        """How many times one message is tried: once, then once per retry delay."""
        return 1 + len(self.settings.webhook_retry_s)

    def send(self, url: str, message_id: str, body: dict[str, Any], record: Record, done: int = 0) -> None:
        """Deliver `body` in the background; `done` attempts were made before (by a process that stopped)."""
        payload = json.dumps(body, separators=(",", ":"))
        task = asyncio.create_task(self._deliver(url, message_id, payload, record, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for deliveries in flight, then stop the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()

    async def _deliver(self, url: str, message_id: str, body: str, record: Record, done: int) -> None:
        delays = [0.0, *self.settings.webhook_retry_s[done:]]  # the first try of a resumed delivery goes at once
        for attempt, delay in enumerate(delays, start=done + 1):
            await asyncio.sleep(delay)
            began = time.time()
            status, error = await self._attempt(url, message_id, body)
            delivered = status is not None and 200 <= status < 300
            await record({"attempt": attempt, "at": round(began, 3), "seconds": round(time.time() - began, 3),
                          "status_code": status, "error": error, "delivered": delivered})
            if delivered:
                return
            log.warning("webhook delivery failed", extra={"message_id": message_id, "attempt": attempt,
                                                          "status_code": status, "error": error})

    async def _attempt(self, url: str, message_id: str, body: str) -> tuple[int | None, str | None]:
        """(the receiver's status, None), or (None, why no answer came)."""
        timestamp = datetime.datetime.now(tz=datetime.timezone.utc)
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(timestamp.timestamp())),
            "webhook-signature": self.signer.sign(message_id, timestamp, body),
        }
        timeout = self.settings.webhook_timeout_s
        try:
            parsed = net.parse_url(url, "webhook_url")
            addresses = await net.vetted_addresses(parsed, self.settings, "webhook_url")
            async with httpx.AsyncClient(trust_env=False) as client:
                response = await asyncio.wait_for(
                    net.send_pinned(client, "POST", parsed, addresses, httpx.Timeout(timeout), headers,
                                    body.encode()), timeout)
                return response.status_code, None
        except InvalidInput as refused:
            return None, refused.message
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return None, f"no answer within {timeout:g} s"
        except httpx.HTTPError as failure:
            return None, f"{type(failure).__name__}: {failure}"
