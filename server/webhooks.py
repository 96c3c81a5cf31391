"""Webhooks: a finished request's object POSTed to its `webhook_url`, signed per Standard Webhooks.

Headers `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">` under a `whsec_` secret (`LOUPE_WEBHOOK_SECRET`, or one generated once and kept in the
data dir). A failed delivery (no answer within the timeout, or not a 2xx) is retried after each delay of
`LOUPE_WEBHOOK_RETRY_S`; every attempt is recorded on the request. The URL passes the outbound policy when
it is submitted and again at every attempt, and redirects are never followed. With API keys, each key's
deliveries are signed with a secret of its own, derived from the master secret and the key.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from standardwebhooks import Webhook

from server import outbound
from server.config import Settings, SettingsError
from server.errors import InvalidInput
from server.outbound import Outbound

log = logging.getLogger("loupe.webhooks")

MAX_URL_LENGTH = 2048
_SECRET_FILE = "webhook-secret"
_PREFIX = "whsec_"
_MIN_SECRET_BYTES = 16

Record = Callable[[dict[str, Any]], Awaitable[None]]  # stores one attempt on the request


def load_secret(settings: Settings) -> str:
    """`LOUPE_WEBHOOK_SECRET`, else the data dir's secret, made on first use and readable by its owner only.
    SettingsError, naming the variable or the file, when it can't be had."""
    if settings.webhook_secret is not None:
        return _check_secret(settings.webhook_secret, "LOUPE_WEBHOOK_SECRET")
    path = settings.data_dir / _SECRET_FILE
    try:
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
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise SettingsError(f"the webhook secret file {path} can't be read or made ({reason}): fix it, or set "
                            "LOUPE_WEBHOOK_SECRET") from None


def _check_secret(secret: str, where: str) -> str:
    try:
        key = base64.b64decode(secret[len(_PREFIX):], validate=True) if secret.startswith(_PREFIX) else b""
    except ValueError:
        key = b""
    if len(key) < _MIN_SECRET_BYTES:
        raise SettingsError(f"{where} must be a Standard Webhooks secret: whsec_ followed by the base64 of at least "
                            f"{_MIN_SECRET_BYTES} random bytes")
    return secret


def secret_for(master: str, owner: str | None) -> str:
    """The secret that signs the webhooks of one API key's requests: the master secret itself on a server without
    keys; with keys, each key's own, derived from the master secret and the key, so that no key can sign as
    another."""
    if owner is None:
        return master
    key = base64.b64decode(master[len(_PREFIX):])
    derived = hmac.new(key, b"loupe webhook secret for " + owner.encode(), hashlib.sha256).digest()
    return _PREFIX + base64.b64encode(derived).decode()


async def check_url(url: str, settings: Settings) -> str:
    """The `webhook_url` a client gave, if Loupe may call it: http(s), at most 2048 characters, a public host
    (any host with LOUPE_ALLOW_PRIVATE_URLS). InvalidInput on param `webhook_url` otherwise."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput(f"webhook_url is longer than {MAX_URL_LENGTH} characters", "webhook_url")
    try:
        await Outbound.of(settings, trust_providers=False).vet(outbound.parse_url(url, "webhook_url"), "webhook_url")
    except outbound.Unreachable as failure:
        raise InvalidInput(f"could not reach webhook_url: {failure.message}", "webhook_url") from None
    except outbound.OutboundFailure as failure:
        raise InvalidInput(failure.message, "webhook_url") from None
    return url


class Deliverer:
    """Sends the webhooks of finished requests, each in a task of its own, so that a slow receiver holds up
    nothing else."""

    def __init__(self, settings: Settings, secret: str) -> None:
        self.settings = settings
        self.secret = secret  # the master secret; each key's deliveries are signed with its own (`secret_for`)
        self.policy = Outbound.of(settings, trust_providers=False)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def attempts(self) -> int:
        """How many times one message is tried: once, then once per retry delay."""
        return 1 + len(self.settings.webhook_retry_s)

    def send(self, url: str, message_id: str, body: dict[str, Any], record: Record, *, owner: str | None,
             done: int = 0) -> None:
        """Deliver `body` in the background, signed with the secret of `owner` (the request's API key); `done`
        attempts were made before (by a process that stopped)."""
        payload = json.dumps(body, separators=(",", ":"))
        signer = Webhook(secret_for(self.secret, owner))
        task = asyncio.create_task(self._deliver(url, message_id, payload, signer, record, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for deliveries in flight, then stop the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()

    async def _deliver(self, url: str, message_id: str, body: str, signer: Webhook, record: Record,
                       done: int) -> None:
        delays = [0.0, *self.settings.webhook_retry_s[done:]]  # the first try of a resumed delivery goes at once
        for attempt, delay in enumerate(delays, start=done + 1):
            await asyncio.sleep(delay)
            began = time.time()
            status, error = await self._attempt(url, message_id, body, signer)
            delivered = status is not None and 200 <= status < 300
            await record({"attempt": attempt, "at": round(began, 3), "seconds": round(time.time() - began, 3),
                          "status_code": status, "error": error, "delivered": delivered})
            if delivered:
                return
            log.warning("webhook delivery failed", extra={"message_id": message_id, "attempt": attempt,
                                                          "status_code": status, "error": error})

    async def _attempt(self, url: str, message_id: str, body: str, signer: Webhook) -> tuple[int | None, str | None]:
        """(the receiver's status, None), or (None, why no answer came)."""
        timestamp = datetime.datetime.now(tz=datetime.timezone.utc)
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(timestamp.timestamp())),
            "webhook-signature": signer.sign(message_id, timestamp, body),
        }
        timeout = self.settings.webhook_timeout_s
        try:
            async with httpx.AsyncClient(trust_env=False) as client:
                response = await asyncio.wait_for(
                    self.policy.send(client, "POST", url, noun="webhook_url", timeout=httpx.Timeout(timeout),
                                     headers=headers, content=body.encode(), stream=True), timeout)
                await response.aclose()
                return response.status_code, None
        except (asyncio.TimeoutError, outbound.TimedOut):
            return None, f"no answer within {timeout:g} s"
        except outbound.OutboundFailure as failure:
            return None, failure.message
