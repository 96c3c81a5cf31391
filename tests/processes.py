"""The real `loupe` command in child processes, for tests of what a user runs: `loupe serve` and the others."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from scripts.bench import wait_until_serving
from server.config import PROJECT_ROOT
from tests.servers import free_port


def loupe_env(weights_dir: Path, data_dir: Path, **settings: object) -> dict[str, str]:
    """The environment of a `loupe` child: this one's, without any LOUPE_* it has, and the test's settings."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("LOUPE_")}
    env.update({"LOUPE_WEIGHTS_DIR": str(weights_dir), "LOUPE_DATA_DIR": str(data_dir), "LOUPE_DEVICE": "cpu",
                "LOUPE_COMPILE": "0"})
    env.update({f"LOUPE_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def run_loupe(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server and wait for it to end; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=120)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def loupe_serve(env: dict[str, str], log: Path, *, port: int | None = None) -> Iterator[Served]:
    """`loupe serve` on 127.0.0.1, once it answers /healthz; killed at the end if it still runs."""
    port = port or free_port()
    with log.open("ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
                                   cwd=PROJECT_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    served = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_serving(served.url, process, 120, log=log)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)


def poll(check: Any, what: str, timeout: float = 120, every: float = 0.05) -> Any:
    """`check()` until it returns something truthy, which is returned; an AssertionError naming `what` past the
    deadline (a hang, not a slow machine: the deadline is far beyond what the work takes)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(every)


def png(size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (20, 140, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()
