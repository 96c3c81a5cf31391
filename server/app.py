"""The FastAPI app factory and its lifespan: settings, engine, providers, storage."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from server import catalog
from server.api import files, images, models, requests
from server.api.tracking import Tracker
from server.api.guards import RateLimiter, admit
from server.api.middleware import (
    AccessLogMiddleware,
    Admission,
    AdmissionMiddleware,
    RequestLimitsMiddleware,
    RequestIdMiddleware,
    install_error_handlers,
)
from server.config import Settings
from server.errors import LoupeError, without_paths
from server.engine.interface import Engine
from server.engine.runtime import LocalEngine
from server.metrics import Metrics
from server.progress import ProgressHub
from server.remote import RemoteProviders
from server.request_store import RequestStore, database_path
from server.serving import Services
from server.storage import ResultStore
from server.webhooks import Deliverer, load_secret

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("loupe.app")
_FORM_OVERHEAD_BYTES = 1 << 20


async def _sweep_results(store: ResultStore, tracker: Tracker, ttl_s: float, every_s: float) -> None:
    """Results and the records of the requests that made them expire together; the request database is checked
    to still be the file it was (the check logs it, once, when it isn't)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await tracker.database_problem()
            await asyncio.to_thread(store.sweep)
            await tracker.expire(ttl_s)
        except LoupeError as error:  # the database is locked or full: the next sweep tries again
            log.warning("expiring request records failed", extra={"error": error.message})
        except Exception:  # a failed sweep is tried again next time; the sweeper must not die of it
            log.exception("expiring results and request records failed")


def create_app(settings: Settings | None = None, engine_factory: Callable[[Settings], Engine] = LocalEngine) -> FastAPI:
    """The app; `engine_factory` makes its engine at start-up (tests pass a fake one)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        records = RequestStore(database_path(settings))  # a database that can't be used stops the start-up here
        secret = load_secret(settings)
        engine = engine_factory(settings)
        await engine.start()
        metrics.watch_engine(engine.stats)
        providers = RemoteProviders(settings)
        store = ResultStore(settings.data_dir / "results", settings.result_ttl_s)
        deliverer = Deliverer(settings, secret)
        tracker = Tracker(records, deliverer, settings.data_dir / "requests")
        services = Services(settings, engine, providers, store, ProgressHub(asyncio.get_running_loop()), tracker,
                            secret)
        app.state.services = services
        try:
            await images.resume_pending(services)
        except LoupeError as error:  # the database is locked or full: the records wait for the next start
            log.error("the last run's requests could not be resumed", extra={"error": error.message})
        sweeper = asyncio.create_task(_sweep_results(store, tracker, settings.result_ttl_s,
                                                     min(60.0, settings.result_ttl_s / 2)))
        try:
            yield
        finally:
            sweeper.cancel()
            await tracker.close()
            await providers.aclose()
            await engine.close()
            records.close()

    app = FastAPI(
        title="Loupe",
        version="0.1.0",
        description="Self-hosted image upscaling with an OpenAI-compatible images API",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    metrics = Metrics()
    app.state.admission = Admission()
    app.add_middleware(RequestLimitsMiddleware, max_bytes=settings.max_image_field_chars + _FORM_OVERHEAD_BYTES)
    app.add_middleware(AdmissionMiddleware, admission=app.state.admission)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)

    app.state.rate_limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None
    guarded = [Depends(admit)]
    for prefix, in_schema in (("/v1", True), ("/openai/v1", False)):
        for router in (images.router, models.router, files.progress_router, requests.router):
            app.include_router(router, prefix=prefix, dependencies=guarded, include_in_schema=in_schema)
    app.include_router(files.results_router)

    @app.get("/healthz", summary="Alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready: a device is up, at least one local model has its weights, and the request "
                                "database is the one the server opened")
    async def readyz(request: Request) -> JSONResponse:
        services: Services = request.app.state.services
        reasons = {e.id: services.engine.unavailable_reason(e) for e in catalog.MODELS if e.local is not None}
        custom = await services.engine.custom_models(0)  # as inspected so far: readiness never waits for a file
        reasons.update({m.id: m.reason for m in custom if m.id not in reasons})
        database = await services.tracker.database_problem()
        draining = request.app.state.admission.draining  # after SIGTERM every /v1 request gets a 503
        ready = any(reason is None for reason in reasons.values()) and not draining and database is None
        status = "draining" if draining else "ready" if ready else "not ready"
        body = {"status": status, "device": services.engine.device_name,
                "models": {name: without_paths(reason) if reason else None for name, reason in reasons.items()}}
        if database is not None:
            body["database"] = without_paths(database)
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    return app
