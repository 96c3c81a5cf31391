"""A whole local job in one call, for tests: the engine's plan for the picture, then its run."""
from __future__ import annotations

from typing import Any

from server.catalog import ModelEntry
from server.engine.runtime import LocalEngine
from server.imaging import Picture


def run(engine: LocalEngine, entry: ModelEntry, picture: Picture, target: tuple[int, int], **options: Any) -> Picture:
    (result,) = engine.upscale_sync(engine.plan(entry, picture, target), picture, **options)
    return result


async def run_async(engine: LocalEngine, entry: ModelEntry, picture: Picture, target: tuple[int, int],
                    **options: Any) -> Picture:
    (result,) = await engine.upscale(engine.plan(entry, picture, target), picture, **options)
    return result
