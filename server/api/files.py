"""Result files (`/results/{name}`) and live progress (`/v1/progress/{request_id}`)."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, StreamingResponse

from server.api.guards import principal
from server.errors import NotFound
from server.serving import Services

results_router = APIRouter()
progress_router = APIRouter()


@results_router.get("/results/{name}", summary="A stored result image, until it expires")
async def get_result(name: str, request: Request) -> FileResponse:
    services: Services = request.app.state.services
    found = services.store.open(name)
    if found is None:
        raise NotFound("this result does not exist or has expired", code="RESULT_NOT_FOUND")
    path, media_type = found
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})


@progress_router.get("/progress/{request_id}", summary="Server-sent events: the progress of a running request of "
                     "the caller's")
async def watch_progress(request_id: str, request: Request) -> StreamingResponse:
    """A key watches its own requests only: another key's request of the same id is, to it, a request that
    hasn't arrived (the stream waits for it a while, then ends)."""
    services: Services = request.app.state.services
    owner = principal(request)

    async def events() -> AsyncIterator[str]:
        async for state in services.progress.watch(owner, request_id):
            if await request.is_disconnected():
                return
            yield f"data: {json.dumps(state.as_dict())}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})
