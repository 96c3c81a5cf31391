"""GET /v1/requests[/{id}], DELETE /v1/requests/{id} and GET /v1/webhooks/secret: each API key's own."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request

from server.api.guards import principal
from server.api.protocol import ErrorResponse, RequestList, RequestObject, WebhookSecret
from server.errors import InvalidInput
from server.request_store import Status
from server.serving import Services
from server.webhooks import secret_for

router = APIRouter()

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404)}


@router.get("/requests/{request_id}", response_model=RequestObject, responses=_ERRORS,
            summary="A request's status, and its result or error once it has ended")
async def get_request(request_id: str, request: Request) -> RequestObject:
    services: Services = request.app.state.services
    return services.tracker.describe(await services.tracker.get(request_id, principal(request)))


@router.get("/requests", response_model=RequestList, responses=_ERRORS, summary="Requests, newest first")
async def list_requests(request: Request, status: Status | None = None, limit: int = Query(20),
                        after: str | None = Query(None, description="the id of the last request of the page before")
                        ) -> RequestList:
    if not 1 <= limit <= 100:
        raise InvalidInput("limit must be between 1 and 100", "limit")
    services: Services = request.app.state.services
    owner = principal(request)
    if after is not None:
        await services.tracker.get(after, owner)  # an unknown cursor is a 404, not an empty page
    rows, more = await services.tracker.page(owner, status=status, limit=limit, after=after)
    data = [services.tracker.describe(row) for row in rows]
    return RequestList(data=data, has_more=more, first_id=data[0].id if data else None,
                       last_id=data[-1].id if data else None)


@router.delete("/requests/{request_id}", response_model=RequestObject, responses=_ERRORS,
               summary="Cancel a pending or running request")
async def cancel_request(request_id: str, request: Request) -> RequestObject:
    services: Services = request.app.state.services
    return await services.tracker.cancel(request_id, principal(request))


@router.get("/webhooks/secret", response_model=WebhookSecret, responses=_ERRORS,
            summary="The secret that signs the webhooks of the caller's requests (Standard Webhooks, whsec_…)")
async def webhook_secret(request: Request) -> WebhookSecret:
    """With API keys, each key's own: no key can sign, or verify, another key's deliveries."""
    services: Services = request.app.state.services
    return WebhookSecret(secret=secret_for(services.webhook_secret, principal(request)))
