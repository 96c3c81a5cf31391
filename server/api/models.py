"""GET /v1/models: every local and remote model id, and whether and where it can run now."""
from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request

from server import catalog
from server.api.protocol import ModelCard, ModelList
from server.catalog import ModelEntry
from server.errors import ApiError
from server.serving import Services

router = APIRouter()
_CREATED = 1_735_689_600  # 2025-01-01: model cards need a stable creation time


def _card(entry: ModelEntry, services: Services) -> ModelCard:
    local = None
    where = None
    if entry.local is not None:
        reason = services.engine.unavailable_reason(entry)
        execution = services.engine.execution(entry)
        local = {"runnable": reason is None, "reason": reason, "native_scales": list(entry.local.native_scales),
                 "device": services.engine.device_name, "precision": execution.precision,
                 "layout": execution.layout}
        if reason is None:
            where = "local"
    provider = services.providers.route(entry, entry.id)
    usable = provider is not None and (entry.local is None or services.settings.fallback != "never")
    remote = [provider.name] if usable and provider is not None else []
    if where is None and remote:
        where = remote[0]
    return ModelCard(
        id=entry.id,
        created=_CREATED,
        owned_by=entry.owned_by,
        description=entry.description,
        aliases=list(entry.aliases),
        default_scale=entry.default_scale,
        runnable=where is not None,
        where=where,
        local=local,
        remote=remote,
        price=dataclasses.asdict(entry.price) if entry.price is not None else None,
    )


@router.get("/models", response_model=ModelList, summary="List models")
async def list_models(request: Request) -> ModelList:
    services: Services = request.app.state.services
    return ModelList(data=[_card(entry, services) for entry in catalog.MODELS])


@router.get("/models/{model_id}", response_model=ModelCard, summary="Describe one model")
async def get_model(model_id: str, request: Request) -> ModelCard:
    entry = catalog.find(model_id)
    if entry is None:
        raise ApiError(404, f"the model `{model_id}` does not exist", param="model", code="MODEL_NOT_FOUND", retryable=False)
    return _card(entry, request.app.state.services)
