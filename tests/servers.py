"""Real HTTP servers on 127.0.0.1 for tests: Loupe itself, and fake upstreams."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(app: object, *, port: int | None = None, **options: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread; yield its base URL (http://127.0.0.1:PORT).

    `options` go to uvicorn.Config (e.g. ssl_certfile and ssl_keyfile; the URL stays http://).
    """
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def hanging_up_port() -> Iterator[tuple[str, list[int]]]:
    """A port on 127.0.0.1 that takes each connection and closes it at once, answering nothing; yields its base URL
    and a one-item list: the connections taken so far (counted before each is closed, so before its client sees the
    failure)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)  # only how often the loop looks at `stop`
    stop, taken = threading.Event(), [0]

    def loop() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            taken[0] += 1
            connection.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", taken
    finally:
        stop.set()
        thread.join(timeout=30)
        listener.close()
