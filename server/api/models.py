"""GET /v1/models: every local and remote model id, and whether and where it can run now."""
from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request

from server import catalog
from server.api.protocol import ModelCard, ModelList
from server.catalog import ModelEntry
from server.engine.custom import CustomModel
from server.engine.directory import LISTING_WAIT_S
from server.errors import NotFound, without_paths
from server.routing import remote_for
from server.serving import Services

router = APIRouter()
_CREATED = 1_735_689_600  # 2025-01-01: model cards need a stable creation time


def _card(entry: ModelEntry, services: Services, name: str | None = None) -> ModelCard:
    """`name`: an alias of the entry, listed as a model of its own because gateway clients look for it as an id."""
    local = None
    where = None
    if entry.local is not None:
        reason = services.engine.unavailable_reason(entry)
        execution = services.engine.execution(entry)
        local = {"runnable": reason is None, "reason": without_paths(reason) if reason is not None else None,
                 "native_scales": list(entry.local.native_scales),
                 "device": services.engine.device_name, "precision": execution.precision,
                 "layout": execution.layout}
        if reason is None:
            where = "local"
    provider = remote_for(entry, entry.id, services.settings, services.providers)
    remote = [provider.name] if provider is not None else []
    if where is None and remote:
        where = remote[0]
    return ModelCard(
        id=name or entry.id,
        alias_of=entry.id if name not in (None, entry.id) else None,
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


def _custom_card(model: CustomModel, services: Services) -> ModelCard:
    """A file of the custom folder: what spandrel found in it, and why it can't run when it can't."""
    card = _card(model.entry, services) if model.reason is None else None
    local = dict(card.local or {}) if card is not None else {
        "runnable": False, "reason": without_paths(model.reason or ""), "native_scales": [model.scale]}
    local.update(architecture=model.architecture, parameters=model.params, channels=model.channels,
                 purpose=model.purpose, file=model.path.name)
    return ModelCard(id=model.id, created=_CREATED, owned_by="custom", description=model.entry.description,
                     aliases=[], default_scale=model.scale, runnable=model.reason is None,
                     where="local" if model.reason is None else None, local=local, remote=[], price=None)


@router.get("/models", response_model=ModelList, summary="List models")
async def list_models(request: Request) -> ModelList:
    services: Services = request.app.state.services
    custom = await services.engine.custom_models(LISTING_WAIT_S)
    return ModelList(data=[_card(entry, services, name) for entry in catalog.MODELS for name in (entry.id, *entry.aliases)]
                     + [_custom_card(model, services) for model in custom])


@router.get("/models/{model_id}", response_model=ModelCard, summary="Describe one model")
async def get_model(model_id: str, request: Request) -> ModelCard:
    services: Services = request.app.state.services
    entry = catalog.find(model_id)
    if entry is not None:
        return _card(entry, services, model_id)
    found = next((m for m in await services.engine.custom_models(LISTING_WAIT_S) if m.id == model_id), None)
    if found is None:
        raise NotFound(f"the model `{model_id}` does not exist", "model", code="MODEL_NOT_FOUND")
    return _custom_card(found, services)
