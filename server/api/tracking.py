"""The life of every edit as a request record: begun, running, ended; async ones run in the background.

A record is its API key's own, keyed by (owner, id). Sync edits are recorded as they run. An async edit is
answered 202 once it is valid and its record and inputs are kept (the form in the record, the image bytes in
the data dir), so that a job pending at shutdown, or only queued when the process died, runs after the
restart. "processing" means computing: a job is marked so when a device or a provider takes it, and one
that was computing when the process died can't be resumed halfway: it is marked failed, and its webhook
says so. When a request with a `webhook_url` ends, its object is posted there.

The store is used from one thread of its own, so a locked database never holds up the event loop or the
threads that decode pictures. Reads that can't wait for it answer 503 (retryable); the writes that make a
request's record (its start, its end, its webhook attempts) must not be lost: each is tried at once, and one
the store refuses (locked by another process, disk full) is kept with every write after it, in order, and
retried with backoff until it lands. A request's end is also written to a journal file first, so that a
process that dies before the store took it still leaves it on disk for the next start. A sync edit never
fails because its record could not be written yet; an async one, whose record is its only trace, does.
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from server.api.errors import error_object
from server.api.protocol import ImagesResponse, RequestObject
from server.errors import Cancelled, Conflict, LoupeError, NotFound
from server.request_store import FINAL, RequestRow, RequestStore, Status
from server.storage import write_atomically
from server.webhooks import Deliverer

log = logging.getLogger("loupe.requests")
T = TypeVar("T")

# A job's run: it calls its `on_start` argument (on the event loop) once a device or provider takes it.
Work = Callable[[threading.Event, Callable[[], None]], Awaitable[ImagesResponse]]

INTERRUPTED = {"message": "the server stopped while this request was running; send it again",
               "type": "server_error", "param": None, "code": "INTERRUPTED"}
CANCELLED = {"message": "the request was cancelled", "type": "invalid_request_error", "param": None,
             "code": "CANCELLED"}
ACTIVE: tuple[Status, ...] = ("pending", "processing")
KEPT = object()  # what a write's future gives when the store refused it and it waits to be retried

READ_PATIENCE_S = 2.0  # how long a read waits out a database another process has locked, before a 503
WRITE_PATIENCE_S = 1.0  # how long a write is tried before it is kept and retried in the background
_RETRY_FIRST_S, _RETRY_MAX_S = 0.25, 10.0
_CLOSE_FLUSH_S = 5.0  # at shutdown, how long the writes still kept may take to land (endings stay journaled)


@dataclass
class _Running:
    """A request running in this process: its cancel flag, and its task when it runs in the background."""

    background: bool
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None


@dataclass
class _Write:
    """One write the store must take: `apply(patience_s)` on the store's thread, then `then(result)` on the loop."""

    what: str
    apply: Callable[[float], Any]
    then: Callable[[Any], Awaitable[None]] | None = None


class Tracker:
    def __init__(self, store: RequestStore, deliverer: Deliverer, inputs: Path) -> None:
        self.store = store
        self.deliverer = deliverer
        self.inputs = inputs  # an async job's image bytes until it ends; `endings/` the journal of ends
        self._running: dict[tuple[str | None, str], _Running] = {}
        self._closing = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="loupe-records")
        self._kept: collections.deque[tuple[_Write, asyncio.Future[Any]]] = collections.deque()
        self._refusal: LoupeError | None = None  # why the store refuses writes now; None while it takes them
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    # The store, on its own thread.

    async def _call(self, apply: Callable[[float], T], patience_s: float) -> T:
        """`apply(patience left)` on the store's thread: the patience counts the wait for the thread too."""
        deadline = time.monotonic() + patience_s
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, lambda: apply(max(0.0, deadline - time.monotonic())))

    def _write(self, write: _Write) -> asyncio.Future[Any]:
        """Queue a write that must land. The future gives, once it is known, the write's result when it landed at
        once, or KEPT when it was kept to be retried; kept writes land in order, each followed by its `then`."""
        landed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._kept.append((write, landed))
        if self._refusal is not None:
            landed.set_result(KEPT)
        if self._writer is None:  # in a context of its own: its log lines belong to no request
            self._writer = contextvars.Context().run(asyncio.create_task, self._write_all())
        self._wake.set()
        return landed

    async def _write_all(self) -> None:
        delay = _RETRY_FIRST_S
        while True:
            if not self._kept:
                self._wake.clear()
                await self._wake.wait()
                continue
            write, landed = self._kept[0]
            try:
                result = await self._call(write.apply, WRITE_PATIENCE_S)
            except LoupeError as refusal:
                if self._refusal is None:
                    log.error("the request database refused a write; it is kept with those after it and retried "
                              "until it lands", extra={"write": write.what, "error": refusal.message})
                self._refusal = refusal
                for _, waiting in self._kept:
                    if not waiting.done():
                        waiting.set_result(KEPT)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            except Exception:  # a bug, not the store's refusal: retrying would fail the same way
                log.exception("a request record write failed", extra={"write": write.what})
                result = None
            if self._refusal is not None:
                log.warning("the request database takes writes again", extra={"kept": len(self._kept)})
            self._refusal, delay = None, _RETRY_FIRST_S
            self._kept.popleft()
            if not landed.done():
                landed.set_result(result)
            if write.then is not None:
                try:
                    await write.then(result)
                except Exception:
                    log.exception("after a request record write", extra={"write": write.what})

    async def _waited(self, apply: Callable[[float], T]) -> T:
        """An operation its caller waits for (a read, the expiry): the store's refusal past READ_PATIENCE_S."""
        return await self._call(apply, READ_PATIENCE_S)

    # Every edit.

    async def begin(self, request_id: str, owner: str | None, model: str, *, cancel: threading.Event | None = None,
                    webhook_url: str | None = None, job: dict[str, Any] | None = None) -> RequestRow:
        """The record of a request that starts now, "pending" until a device or provider takes it: a sync edit's
        (whose `cancel` flag DELETE sets), or an async one's (with its `job`). Conflict while the key's id is in
        use. A sync edit whose record the store can't take yet runs anyway (the record follows); an async one
        gets the store's refusal (503 while it is locked, 507 while the disk is full)."""
        key = (owner, request_id)
        if key in self._running:
            raise Conflict(f"another request of yours with the id {request_id} is still running; send a fresh "
                           "X-Request-Id", code="REQUEST_ID_IN_USE")
        background = job is not None
        row = RequestRow(id=request_id, owner=owner, status="pending", created=time.time(), model=model,
                         background=background, webhook_url=webhook_url, job=job)
        self._running[key] = _Running(background, cancel or threading.Event())
        try:
            if background:
                claimed = await self._call(lambda patience: self.store.claim(row, patience), WRITE_PATIENCE_S)
            else:
                outcome = await self._write(_Write(f"begin {request_id}", lambda p: self.store.claim(row, p)))
                claimed = outcome is KEPT or bool(outcome)
        except BaseException:
            self._running.pop(key, None)
            raise
        if not claimed:
            self._running.pop(key, None)
            raise Conflict(f"the request id {request_id} is still in use by a request of yours; send a fresh "
                           "X-Request-Id", code="REQUEST_ID_IN_USE")
        return row

    async def rejected(self, request_id: str, owner: str | None, model: str, error: LoupeError) -> None:
        """The record of an edit refused before it began (its image, its model, its webhook URL), written when the
        store takes it; never over a running request's record."""
        now = time.time()
        row = RequestRow(id=request_id, owner=owner, status="failed", created=now, completed_at=now, model=model,
                         background=False, error=error_object(error))
        await self._write(_Write(f"refusal of {request_id}", lambda p: self.store.claim(row, p)))

    def started(self, request_id: str, owner: str | None) -> None:
        """A device or provider took the request's job: it is "processing" from now (recorded in the background)."""
        now = time.time()
        self._write(_Write(f"start of {request_id}", lambda p: self.store.update(
            owner, request_id, only_if=("pending",), patience_s=p, status="processing", started_at=now)))

    async def completed(self, request_id: str, owner: str | None, response: ImagesResponse) -> None:
        result = response.model_dump(exclude_none=True)
        running = self._running.get((owner, request_id))
        if running is not None and not running.background:
            # A sync caller has its b64_json images in hand: the record keeps their place, not another copy.
            result["data"] = [{**item, "b64_json": None} if "b64_json" in item else item for item in result["data"]]
        metadata = response.metadata
        await self._end(request_id, owner, "completed", result=result, executed_model=metadata.executed_model,
                        provider=metadata.provider, cost=metadata.cost)

    async def failed(self, request_id: str, owner: str | None, error: BaseException) -> None:
        if isinstance(error, (Cancelled, asyncio.CancelledError)):
            await self._end(request_id, owner, "cancelled", error=CANCELLED)
        else:
            await self._end(request_id, owner, "failed", error=error_object(error))

    async def _end(self, request_id: str, owner: str | None, status: Status, **changes: Any) -> None:
        """The request's end: journaled, then recorded once (whichever of its run and a cancel comes first), then
        its kept input dropped and its webhook sent, once the record has it."""
        self._running.pop((owner, request_id), None)
        ending = {"status": status, "completed_at": time.time(), "job": None, **changes}
        journal = self._journal_path(owner, request_id)
        await asyncio.to_thread(_journal, journal, owner, request_id, ending)  # a file: no wait behind the store

        async def ended(row: RequestRow | None) -> None:
            journal.unlink(missing_ok=True)
            self.input_path(request_id, owner).unlink(missing_ok=True)
            if row is not None:
                self._notify(row)

        self._write(_Write(f"end of {request_id}", lambda p: self.store.update(
            owner, request_id, only_if=ACTIVE, patience_s=p, **ending), ended))

    # Async edits.

    def input_path(self, request_id: str, owner: str | None) -> Path:
        return self.inputs / f"{_file_key(owner, request_id)}.input"

    def _journal_path(self, owner: str | None, request_id: str) -> Path:
        return self.inputs / "endings" / f"{_file_key(owner, request_id)}.json"

    def run_in_background(self, request_id: str, owner: str | None, work: Work) -> None:
        """Run `work` (the job) in a task of its own, recording its start and its end."""
        running = self._running.setdefault((owner, request_id), _Running(background=True))
        running.task = asyncio.create_task(self._background(request_id, owner, work, running))

    async def _background(self, request_id: str, owner: str | None, work: Work, running: _Running) -> None:
        try:
            response = await work(running.cancel, functools.partial(self.started, request_id, owner))
            # Shielded: a cancel arriving now can't cut the record short; the first ending recorded stands.
            await asyncio.shield(self.completed(request_id, owner, response))
        except BaseException as error:  # every ending is recorded, then a cancellation re-raised
            if self._closing:  # stopped by the shutdown, not by its client: it runs again after the restart
                self._running.pop((owner, request_id), None)
                self._write(_Write(f"requeue of {request_id}", lambda p: self.store.update(
                    owner, request_id, only_if=("processing",), patience_s=p, status="pending", started_at=None)))
            else:
                await asyncio.shield(self.failed(request_id, owner, error))
            if isinstance(error, asyncio.CancelledError):
                raise
            if not isinstance(error, LoupeError):
                log.exception("async request %s failed", request_id)

    async def cancel(self, request_id: str, owner: str | None) -> RequestObject:
        """Cancel a pending or running request: the engine stops at its next tile, a remote job is cancelled
        upstream where its provider allows it. A request that has already ended is returned as it is."""
        row = await self.get(request_id, owner)
        running = self._running.get((owner, request_id))
        if row.status not in FINAL or running is not None:
            if running is not None:
                running.cancel.set()
                if running.task is not None:
                    running.task.cancel()
                    await asyncio.gather(running.task, return_exceptions=True)
            await self._end(request_id, owner, "cancelled", error=CANCELLED)
            await self.flush(READ_PATIENCE_S)
        return self.describe(await self.get(request_id, owner))

    async def flush(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the writes queued so far to land."""
        if not self._kept:
            return
        landed = asyncio.Event()

        async def mark(_: Any) -> None:
            landed.set()

        self._write(_Write("flush", lambda _: None, mark))
        try:
            await asyncio.wait_for(landed.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    async def close(self) -> None:
        """At shutdown: stop the jobs running in the background here and put them back to pending, to run after
        a restart; give the webhooks in flight, and then the writes still kept, a moment to land (an ending that
        can't stays in its journal, a webhook is sent again at the next start)."""
        self._closing = True
        tasks = [running.task for running in self._running.values() if running.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.deliverer.drain(timeout_s=_CLOSE_FLUSH_S)
        await self.flush(_CLOSE_FLUSH_S)
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        self._thread.shutdown(wait=True)

    # After a restart.

    async def recover(self) -> list[RequestRow]:
        """Record the ends the last process journaled but could not record, resend the webhooks it left
        undelivered, fail the requests it left computing (which sends theirs) and the sync ones it left waiting
        (their clients are gone), and return the async requests it left pending, to run."""
        for row in await self._waited(lambda p: self.store.undelivered(patience_s=p)):
            if len(row.webhook_attempts) < self.deliverer.attempts:
                self._notify(row)
        for owner, request_id, ending in await asyncio.to_thread(_journaled, self.inputs / "endings"):
            await self._end(request_id, owner, ending.pop("status"), **ending)
        await self.flush(READ_PATIENCE_S)
        waiting = await self._waited(lambda p: self.store.with_status(*ACTIVE, patience_s=p))
        for row in waiting:
            if row.status == "processing" or not row.background:
                await self._end(row.id, row.owner, "failed", error=INTERRUPTED)
        return [row for row in waiting if row.status == "pending" and row.background]

    # Reads.

    async def get(self, request_id: str, owner: str | None) -> RequestRow:
        row = await self._waited(lambda p: self.store.get(owner, request_id, patience_s=p))
        if row is None:
            raise NotFound(f"no request {request_id}", "request_id", code="REQUEST_NOT_FOUND")
        return row

    async def page(self, owner: str | None, *, status: Status | None, limit: int,
                   after: str | None) -> tuple[list[RequestRow], bool]:
        return await self._waited(lambda p: self.store.page(owner, status=status, limit=limit, after=after,
                                                          patience_s=p))

    async def expire(self, ttl_s: float) -> int:
        return await self._waited(lambda p: self.store.expire(ttl_s, patience_s=p))

    async def database_problem(self) -> str | None:
        """Why the request database is no longer the file at its path, or None (checked on the store's thread: the
        first time, its records are saved)."""
        return await self._call(lambda _: self.store.vanished(), 0.0)

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
        owner, request_id = row.owner, row.id

        async def record(attempt: dict[str, Any]) -> None:
            self._write(_Write(f"webhook attempt of {request_id}", lambda p: self.store.add_webhook_attempt(
                owner, request_id, attempt, patience_s=p)))

        # One message id per request record (a reused request id starts a new one), the same on every retry.
        message_id = f"msg_{row.id}_{int(row.created * 1000)}"
        self.deliverer.send(row.webhook_url, message_id, body, record, owner=owner, done=len(row.webhook_attempts))


def _second(value: float | None) -> int | None:
    return None if value is None else int(value)


def _file_key(owner: str | None, request_id: str) -> str:
    """A file name for a key's request: ids are each key's own, so two keys' files of one id must differ."""
    return hashlib.sha256(f"{owner or ''}/{request_id}".encode()).hexdigest()[:40]


def _journal(path: Path, owner: str | None, request_id: str, ending: dict[str, Any]) -> None:
    """Best effort: a disk too full for the journal still lets the store try (and the log says so)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps({"owner": owner, "id": request_id, "ending": ending}).encode(),
                         durable=False)
    except OSError as error:
        log.warning("could not journal a request's end", extra={"request": request_id, "error": str(error)})


def _journaled(folder: Path) -> list[tuple[str | None, str, dict[str, Any]]]:
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
            found.append((entry["owner"], entry["id"], dict(entry["ending"])))
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("skipping an unreadable journal of a request's end", extra={"path": path.name,
                                                                                   "error": str(error)})
    return found
