"""Run the app under uvicorn: a deadline to receive each request, and a graceful shutdown (on SIGTERM, refuse
new work, finish what's in flight, exit)."""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from types import FrameType
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.middleware import Admission
from server.app import create_app
from server.config import Settings
from server.logs import configure_logging_for

log = logging.getLogger("loupe.serve")


class _ReadDeadline(H11Protocol):
    """h11 with a deadline (LOUPE_READ_TIMEOUT_S) to receive a request's headers and body, from its first byte.

    uvicorn has none: a client sending a byte a second would hold its connection, and keep a draining server
    up, forever. Past the deadline the connection is closed; the app, if it had the headers, sees a disconnect.
    """

    read_timeout_s = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._deadline = self.loop.call_later(self.read_timeout_s, self._deadline_passed)
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._cancel_deadline()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        # MUST_CLOSE: all in, from a client that sent `Connection: close` or spoke HTTP/1.0.
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE) or self.transport.is_closing():
            return  # the request is in; its answer may take as long as it takes
        log.info("closing a connection that did not send its request within %g s (LOUPE_READ_TIMEOUT_S)",
                 self.read_timeout_s, extra={"client": f"{self.client[0]}:{self.client[1]}" if self.client else "-"})
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()


def http_protocol(settings: Settings) -> type[H11Protocol]:
    """The HTTP protocol class for uvicorn.Config(http=...), with this server's read deadline."""
    return type("LoupeH11Protocol", (_ReadDeadline,), {"read_timeout_s": settings.read_timeout_s})


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


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    # log_config=None keeps uvicorn from replacing the JSON handler with its own.
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                          http=http_protocol(settings))


def run(settings: Settings, sock: socket.socket) -> None:
    """Serve on `sock`, already listening (so that an address in use was a start-up error, not uvicorn's)."""
    configure_logging_for(settings)
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    asyncio.run(_DrainingServer(config, app.state.admission, settings.request_timeout_s).serve(sockets=[sock]))
