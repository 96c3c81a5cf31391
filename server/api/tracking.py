"""The life of every edit as a request record: begun, running, ended; async ones run in the background.

Sync edits are recorded as they run. An async edit is answered 202 once it is valid; its inputs are kept
(the form in the record, the image bytes in the data dir) until it ends, so that a job pending at shutdown
runs after the restart. A job that was running when the process died can't be resumed halfway: it is
marked failed, and its webhook says so. When a request with a `webhook_url` ends, its object is posted there.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.api.errors import error_object
from server.api.protocol import ImagesResponse, RequestObject
from server.errors import Cancelled, Conflict, LoupeError, NotFound
from server.request_store import FINAL, RequestRow, RequestStore, Status
from server.webhooks import Deliverer

log = logging.getLogger("loupe.requests")

# A job's run: it awaits its `started` argument once a device or provider has taken it.
Work = Callable[[threading.Event, Callable[[], Awaitable[None]]], Awaitable[ImagesResponse]]

INTERRUPTED = {"message": "the server stopped while this request was running; send it again",
               "type": "server_error", "param": None, "code": "INTERRUPTED"}
CANCELLED = {"message": "the request was cancelled", "type": "invalid_request_error", "param": None,
             "code": "CANCELLED"}


@dataclass
class _Running:
    """A request running in this process: its cancel flag, and its task when it runs in the background."""

    background: bool
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None


class Tracker:
    def __init__(self, store: RequestStore, deliverer: Deliverer, inputs: Path) -> None:
        self.store = store
        self.deliverer = deliverer
        self.inputs = inputs  # an async job's image bytes, until it ends
        self._running: dict[str, _Running] = {}
        self._closing = False

    # Every edit.

    async def begin(self, request_id: str, owner: str | None, model: str, *, cancel: threading.Event | None = None,
                    webhook_url: str | None = None, job: dict[str, Any] | None = None) -> RequestRow:
        """The record of a request that starts now: "processing" for a sync edit (whose `cancel` flag DELETE
        sets), "pending" for an async one (with its `job`). Conflict when the id is taken: an id may be
        reused by the key that used it, once its request has ended; never by another key."""
        background = job is not None
        now = time.time()
        row = RequestRow(id=request_id, owner=owner, status="pending" if background else "processing",
                         created=now, started_at=None if background else now, model=model, background=background,
                         webhook_url=webhook_url, job=job)
        if not await asyncio.to_thread(self.store.claim, row):
            raise Conflict(f"the request id {request_id} is taken; send a fresh X-Request-Id",
                           code="REQUEST_ID_IN_USE")
        self._running[request_id] = _Running(background, cancel or threading.Event())
        return row

    async def rejected(self, request_id: str, owner: str | None, model: str, error: LoupeError) -> None:
        """The record of an edit refused before it began (its image, its model, its webhook URL); not written
        over another request's record."""
        now = time.time()
        await asyncio.to_thread(self.store.claim, RequestRow(
            id=request_id, owner=owner, status="failed", created=now, completed_at=now, model=model,
            background=False, error=error_object(error)))

    async def completed(self, request_id: str, response: ImagesResponse) -> None:
        result = response.model_dump(exclude_none=True)
        running = self._running.get(request_id)
        if running is not None and not running.background:
            # A sync caller has its b64_json images in hand: the record keeps their place, not another copy.
            result["data"] = [{**item, "b64_json": None} if "b64_json" in item else item for item in result["data"]]
        metadata = response.metadata
        await self._end(request_id, "completed", result=result, executed_model=metadata.executed_model,
                        provider=metadata.provider, cost=metadata.cost)

    async def failed(self, request_id: str, error: BaseException) -> None:
        if isinstance(error, (Cancelled, asyncio.CancelledError)):
            await self._end(request_id, "cancelled", error=CANCELLED)
        else:
            await self._end(request_id, "failed", error=error_object(error))

    async def _end(self, request_id: str, status: Status, **changes: Any) -> None:
        """The request's end, recorded once (whichever of its run and a cancel comes first), then announced."""
        self._running.pop(request_id, None)
        ended = await asyncio.to_thread(self.store.update, request_id, only_if=("pending", "processing"),
                                        status=status, completed_at=time.time(), job=None, **changes)
        self.input_path(request_id).unlink(missing_ok=True)
        if ended is not None:
            self._notify(ended)

    # Async edits.

    def input_path(self, request_id: str) -> Path:
        return self.inputs / f"{request_id}.input"

    def run_in_background(self, request_id: str, work: Work) -> None:
        """Run `work` (the job) in a task of its own, recording its start and its end."""
        running = self._running.setdefault(request_id, _Running(background=True))
        running.task = asyncio.create_task(self._background(request_id, work, running))

    async def _background(self, request_id: str, work: Work, running: _Running) -> None:
        taken = False

        async def started() -> None:
            nonlocal taken
            if taken:  # sent again after a cluster's full queue refused it: it is still this run
                return
            if not await asyncio.to_thread(self.store.update, request_id, only_if=("pending",),
                                           status="processing", started_at=time.time()):
                raise Cancelled("the request was cancelled before it started")
            taken = True

        try:
            response = await work(running.cancel, started)
            # Shielded: a cancel arriving now can't cut the record short; the first ending recorded stands.
            await asyncio.shield(self.completed(request_id, response))
        except BaseException as error:  # every ending is recorded, then a cancellation re-raised
            if self._closing:  # stopped by the shutdown, not by its client: it runs again after the restart
                await asyncio.shield(asyncio.to_thread(self.store.update, request_id, only_if=("processing",),
                                                       status="pending", started_at=None))
            else:
                await asyncio.shield(self.failed(request_id, error))
            if isinstance(error, asyncio.CancelledError):
                raise
            if not isinstance(error, LoupeError):
                log.exception("async request %s failed", request_id)

    async def cancel(self, request_id: str, owner: str | None, every_owner: bool) -> RequestObject:
        """Cancel a pending or running request: the engine stops at its next tile, a remote job is cancelled
        upstream where its provider allows it. A request that has already ended is returned as it is."""
        row = await self.get(request_id, owner, every_owner)
        if row.status not in FINAL:
            running = self._running.get(request_id)
            if running is not None:
                running.cancel.set()
                if running.task is not None:
                    running.task.cancel()
                    await asyncio.gather(running.task, return_exceptions=True)
            await self._end(request_id, "cancelled", error=CANCELLED)
        return self.describe(await self.get(request_id, owner, every_owner))

    async def close(self) -> None:
        """At shutdown: stop the jobs running in the background here and put them back to pending, to run after
        a restart."""
        self._closing = True
        tasks = [running.task for running in self._running.values() if running.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # After a restart.

    async def recover(self) -> list[RequestRow]:
        """Resend the webhooks the last process left undelivered, fail the requests it left running (which sends
        theirs), and return the async requests it left pending, to run."""
        for row in await asyncio.to_thread(self.store.undelivered):
            if len(row.webhook_attempts) < self.deliverer.attempts:
                self._notify(row)
        for row in await asyncio.to_thread(self.store.with_status, "processing"):
            await self._end(row.id, "failed", error=INTERRUPTED)
        return await asyncio.to_thread(self.store.with_status, "pending")

    # Reads.

    async def get(self, request_id: str, owner: str | None, every_owner: bool) -> RequestRow:
        row = await asyncio.to_thread(self.store.get, request_id)
        if row is None or (not every_owner and row.owner != owner):
            raise NotFound(f"no request {request_id}", "request_id", code="REQUEST_NOT_FOUND")
        return row

    async def page(self, owner: str | None, *, status: Status | None, limit: int, after: str | None,
                   every_owner: bool) -> tuple[list[RequestRow], bool]:
        return await asyncio.to_thread(self.store.page, owner, status=status, limit=limit, after=after,
                                       every_owner=every_owner)

    @staticmethod
    def describe(row: RequestRow) -> RequestObject:
        return RequestObject(id=row.id, status=row.status, created=int(row.created), started_at=_second(row.started_at),
                             completed_at=_second(row.completed_at), model=row.model, executed_model=row.executed_model,
                             provider=row.provider, cost=row.cost, result=row.result, error=row.error,
                             webhook_url=row.webhook_url, webhook_attempts=row.webhook_attempts)

    def _notify(self, row: RequestRow) -> None:
        if row.webhook_url is None:
            return
        body = self.describe(row).model_dump(exclude={"webhook_attempts"})
        request_id = row.id

        async def record(attempt: dict[str, Any]) -> None:
            await asyncio.to_thread(self.store.add_webhook_attempt, request_id, attempt)

        # One message id per request record (a reused request id starts a new one), the same on every retry.
        message_id = f"msg_{row.id}_{int(row.created * 1000)}"
        self.deliverer.send(row.webhook_url, message_id, body, record, done=len(row.webhook_attempts))


def _second(value: float | None) -> int | None:
    return None if value is None else int(value)
