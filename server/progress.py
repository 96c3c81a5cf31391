"""Live progress of running requests, for clients that watch (the playground's progress bar).

The engine reports from worker threads; subscribers read from the event loop.
A channel lives from the first report or subscription until shortly after it ends.
A request claims its channel as it starts: the channel then belongs to the API key that sent
it, and only that key may watch it; while it runs, no other request may claim the same id.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.errors import Conflict, NotFound

FINAL_STAGES = ("done", "failed")
_KEEP_FINISHED_S = 120.0
_IDLE_TIMEOUT_S = 600.0
# A watcher may open the stream just before its request arrives; past this, the id is taken to be unknown.
_FIRST_REPORT_TIMEOUT_S = 30.0


@dataclass
class Progress:
    stage: str = "waiting"  # waiting | queued | running | encoding | done | failed
    done: int = 0
    total: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"stage": self.stage, "done": self.done, "total": self.total}


@dataclass
class _Channel:
    state: Progress = field(default_factory=Progress)
    version: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    finished_at: float | None = None
    claimed: bool = False  # by the request it reports on (before that, only watchers have opened it)
    owner: str | None = None  # who sent that request: a digest of its API key (None without keys)

    @property
    def in_flight(self) -> bool:
        return self.claimed and self.state.stage not in FINAL_STAGES


class ProgressHub:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._channels: dict[str, _Channel] = {}

    def claim(self, request_id: str, owner: str | None) -> None:
        """The channel for a request that is starting; Conflict while another request with that id runs."""
        channel = self._channels.get(request_id)
        if channel is not None and channel.in_flight:
            raise Conflict(f"another request with the id {request_id} is still running; send a fresh X-Request-Id",
                           code="REQUEST_ID_IN_USE")
        if channel is None or channel.claimed:  # a finished request's channel: this one starts afresh
            channel = self._channels[request_id] = _Channel()
        channel.claimed, channel.owner = True, owner

    def check_watcher(self, request_id: str, owner: str | None) -> None:
        """NotFound for a watcher whose key did not send the request: to it, the request does not exist."""
        channel = self._channels.get(request_id)
        if channel is not None and channel.claimed and channel.owner != owner:
            raise NotFound(f"no request {request_id} of yours is known", code="REQUEST_NOT_FOUND")

    def update(self, request_id: str, stage: str, done: int | None = None, total: int | None = None) -> None:
        """Record a new state; call from the event loop."""
        self._set(self._channel(request_id), stage, done, total)

    def _set(self, channel: _Channel, stage: str, done: int | None, total: int | None) -> None:
        if channel.state.stage in FINAL_STAGES:
            return  # a cancelled job's last tiles, reported after its request failed
        state = channel.state
        channel.state = Progress(
            stage, state.done if done is None else done, state.total if total is None else total
        )
        channel.version += 1
        if stage in FINAL_STAGES:
            channel.finished_at = time.monotonic()
        self._loop.create_task(self._notify(channel))
        self._forget_old()

    @staticmethod
    async def _notify(channel: _Channel) -> None:
        async with channel.changed:
            channel.changed.notify_all()

    def tile_reporter(self, request_id: str) -> Callable[[int, int], None]:
        """A callback for worker threads: (tiles done, tiles in all), for this request's channel only (a later
        request may reuse the id)."""
        channel = self._channel(request_id)

        def report(done: int, total: int) -> None:
            stage = "encoding" if total and done >= total else "running"  # the last tile: what is left is encoding
            self._loop.call_soon_threadsafe(self._set, channel, stage, done, total)

        return report

    async def watch(self, request_id: str, owner: str | None) -> AsyncIterator[Progress]:
        """Yield each new state until the request finishes (or nothing happens for a long while).

        A stream opened before its request arrived ends, unread, if a request of another key claims the id.
        """
        channel = self._channel(request_id)
        while True:
            if channel.claimed and channel.owner != owner:
                return
            seen = channel.version
            yield channel.state
            if channel.state.stage in FINAL_STAGES:
                return
            timeout = _IDLE_TIMEOUT_S if seen else _FIRST_REPORT_TIMEOUT_S
            async with channel.changed:
                try:
                    await asyncio.wait_for(channel.changed.wait_for(lambda: channel.version != seen), timeout=timeout)
                except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                    # Nothing ever reported, nor any request claimed it: don't keep the channel.
                    if channel.version == seen and not channel.claimed and self._channels.get(request_id) is channel:
                        del self._channels[request_id]
                    return

    def _channel(self, request_id: str) -> _Channel:
        return self._channels.setdefault(request_id, _Channel())

    def _forget_old(self) -> None:
        now = time.monotonic()
        for key in [k for k, c in self._channels.items() if c.finished_at and now - c.finished_at > _KEEP_FINISHED_S]:
            del self._channels[key]
