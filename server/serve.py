"""Run the app under uvicorn with a graceful shutdown: on SIGTERM, refuse new work, finish what's in flight, exit."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import FrameType

import uvicorn

from server.api.middleware import Admission
from server.app import create_app
from server.config import Settings
from server.logs import configure_logging

log = logging.getLogger("loupe.serve")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, admission: Admission, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._admission = admission
        self._drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._admission.draining:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        self._admission.draining = True
        log.info("draining before exit", extra={"in_flight": self._admission.active})
        threading.Thread(target=self._exit_when_idle, args=(sig, frame), daemon=True).start()

    def _exit_when_idle(self, sig: int, frame: FrameType | None) -> None:
        deadline = time.monotonic() + self._drain_timeout_s
        while self._admission.active > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        super().handle_exit(sig, frame)


def run(settings: Settings) -> None:
    configure_logging(settings.log_level, secrets=[*settings.api_keys, settings.fal_key, settings.gateway_key])
    app = create_app(settings)
    # log_config=None keeps uvicorn from replacing the JSON handler with its own.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    asyncio.run(_DrainingServer(config, app.state.admission, settings.request_timeout_s).serve())
