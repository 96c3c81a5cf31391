"""Live progress of running requests, for clients that watch (the playground's progress bar).

The engine reports from worker threads; subscribers read from the event loop.
A channel lives from the first report or subscription until shortly after it ends.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

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


class ProgressHub:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._channels: dict[str, _Channel] = {}

    def update(self, request_id: str, stage: str, done: int | None = None, total: int | None = None) -> None:
        """Record a new state; call from the event loop."""
        channel = self._channel(request_id)
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
        """A callback for worker threads: (tiles done, tiles in all)."""

        def report(done: int, total: int) -> None:
            self._loop.call_soon_threadsafe(self.update, request_id, "running", done, total)

        return report

    async def watch(self, request_id: str) -> AsyncIterator[Progress]:
        """Yield each new state until the request finishes (or nothing happens for a long while)."""
        channel = self._channel(request_id)
        while True:
            seen = channel.version
            yield channel.state
            if channel.state.stage in FINAL_STAGES:
                return
            timeout = _IDLE_TIMEOUT_S if seen else _FIRST_REPORT_TIMEOUT_S
            async with channel.changed:
                try:
                    await asyncio.wait_for(channel.changed.wait_for(lambda: channel.version != seen), timeout=timeout)
                except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                    if channel.version == seen:  # nothing ever reported: don't keep the channel
                        self._channels.pop(request_id, None)
                    return

    def _channel(self, request_id: str) -> _Channel:
        return self._channels.setdefault(request_id, _Channel())

    def _forget_old(self) -> None:
        now = time.monotonic()
        for key in [k for k, c in self._channels.items() if c.finished_at and now - c.finished_at > _KEEP_FINISHED_S]:
            del self._channels[key]
