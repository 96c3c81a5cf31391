"""What `loupe serve` checks before it serves: every start-up fault is one line naming what to fix, and exit 2.

A fault found later, inside the app's start-up, would be a traceback and uvicorn's exit 3; so everything the
start-up needs from this machine is tried here first: the devices and precision, the data folder and the
folders under it, the request database (its file, schema and lock), the webhook secret, and the address to
listen on.
"""
from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from server.config import Settings, SettingsError
from server.request_store import RequestStore, database_path
from server.webhooks import load_secret

DATA_FOLDERS = ("results", "requests")  # under LOUPE_DATA_DIR: the results, and async requests' kept inputs


def check(settings: Settings, *, local_engine: bool = True) -> None:
    """SettingsError for the first fault; `local_engine`: whether this process runs the engine (not on Ray)."""
    for folder in (settings.data_dir, *(settings.data_dir / name for name in DATA_FOLDERS)):
        _check_writable(folder)
    RequestStore(database_path(settings)).close()
    load_secret(settings)
    if local_engine:
        from server.engine.runtime import engine_devices  # loads torch: last, so that the faults above answer at once

        engine_devices(settings)


def listen(settings: Settings) -> socket.socket:
    """The socket `loupe serve` listens on; SettingsError when the address can't be had."""
    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as error:
        raise SettingsError(f"can't listen on {settings.host}:{settings.port} (LOUPE_HOST, LOUPE_PORT): {error}") \
            from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise SettingsError(f"can't listen on {settings.host}:{settings.port} (LOUPE_HOST, LOUPE_PORT): "
                            f"{error.strerror or error}") from None
    return sock


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".loupe-check-"):
            pass
    except OSError as error:
        raise SettingsError(f"the data folder {folder} can't be written ({error.strerror or error}): fix it, or "
                            "point LOUPE_DATA_DIR elsewhere") from None
