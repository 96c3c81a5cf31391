"""Live progress of running requests, for clients that watch (the playground's progress bar).

A channel is an API key's own: it is keyed by (owner, request id), so a key only ever watches its own
requests, and another key's use of the same id is another channel. A request claims its channel as it
starts; while it runs, no other request of the same key may claim that id. A watcher may open a channel
before its request arrives. The engine reports from worker threads; watchers read from the event loop.
A channel lives from the first report or watcher until shortly after it ends.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.errors import Conflict

FINAL_STAGES = ("done", "failed")
_KEEP_FINISHED_S = 120.0
_IDLE_TIMEOUT_S = 600.0
# A watcher may open the stream just before its request arrives; past this, the id is taken to be unknown.
_FIRST_REPORT_TIMEOUT_S = 30.0

Key = tuple[str | None, str]  # (owner: a digest of the API key, or None without keys; request id)


@dataclass
class Progress:
    stage: str = "waiting"  # waiting | queued | running | encoding | done | failed
    done: int = 0
    total: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"stage": self.stage, "done": self.done, "total": self.total}


@dataclass
class _State:
    progress: Progress = field(default_factory=Progress)
    version: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    finished_at: float | None = None
    claimed: bool = False  # by the request it reports on (before that, only watchers have opened it)

    @property
    def in_flight(self) -> bool:
        return self.claimed and self.progress.stage not in FINAL_STAGES


class Channel:
    """One request's progress, as the request reports it: from the event loop (`update`), or from worker threads
    (`reporter`)."""

    def __init__(self, hub: ProgressHub, state: _State) -> None:
        self._hub = hub
        self._state = state

    def update(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        self._hub._set(self._state, stage, done, total)

    def reporter(self, on_start: Callable[[], None] | None = None) -> Callable[[int, int], None]:
        """A callback for worker threads: (tiles done, tiles in all). Its first call (the engine reports (0, total)
        as a device takes the job) calls `on_start` on the event loop."""
        loop = self._hub.loop
        first = [True]

        def report(done: int, total: int) -> None:
            stage = "encoding" if total and done >= total else "running"  # the last tile: what is left is encoding
            if first[0]:
                first[0] = False
                if on_start is not None:
                    loop.call_soon_threadsafe(on_start)
            loop.call_soon_threadsafe(self._hub._set, self._state, stage, done, total)

        return report


class ProgressHub:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._channels: dict[Key, _State] = {}

    def claim(self, owner: str | None, request_id: str) -> Channel:
        """The channel of a request that is starting; Conflict while another request of the same key with that id
        runs."""
        key = (owner, request_id)
        state = self._channels.get(key)
        if state is not None and state.in_flight:
            raise Conflict(f"another request of yours with the id {request_id} is still running; send a fresh "
                           "X-Request-Id", code="REQUEST_ID_IN_USE")
        if state is None or state.claimed:  # a finished request's channel: this one starts afresh
            state = self._channels[key] = _State()
        state.claimed = True
        return Channel(self, state)

    def _set(self, state: _State, stage: str, done: int | None, total: int | None) -> None:
        if state.progress.stage in FINAL_STAGES:
            return  # a cancelled job's last tiles, reported after its request failed
        current = state.progress
        state.progress = Progress(stage, current.done if done is None else done,
                                  current.total if total is None else total)
        state.version += 1
        if stage in FINAL_STAGES:
            state.finished_at = time.monotonic()
        self.loop.create_task(self._notify(state))
        self._forget_old()

    @staticmethod
    async def _notify(state: _State) -> None:
        async with state.changed:
            state.changed.notify_all()

    async def watch(self, owner: str | None, request_id: str) -> AsyncIterator[Progress]:
        """Yield each new state of the key's request until it finishes (or nothing happens for a long while)."""
        key = (owner, request_id)
        state = self._channels.setdefault(key, _State())
        while True:
            seen = state.version
            yield state.progress
            if state.progress.stage in FINAL_STAGES:
                return
            timeout = _IDLE_TIMEOUT_S if seen else _FIRST_REPORT_TIMEOUT_S
            async with state.changed:
                try:
                    await asyncio.wait_for(state.changed.wait_for(lambda: state.version != seen), timeout=timeout)
                except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                    # Nothing ever reported, nor any request claimed it: don't keep the channel.
                    if state.version == seen and not state.claimed and self._channels.get(key) is state:
                        del self._channels[key]
                    return

    def _forget_old(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._channels.items() if s.finished_at and now - s.finished_at > _KEEP_FINISHED_S]:
            del self._channels[key]
