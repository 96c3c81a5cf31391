"""Starting a local Ray or joining a cluster, and running the Serve application until a signal stops it."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import ray
import torch
from ray import serve

from server.cluster.deployments import APP, application
from server.cluster.layout import plan_layout
from server.config import Settings, SettingsError
from server.engine.precision import check_setting

log = logging.getLogger("loupe.ray")
# Ray puts its sockets under the temp dir, at about 60 characters more; a Unix socket path holds 107.
_MAX_TEMP_DIR = 45


def loupe_env(settings: Settings) -> dict[str, str]:
    """The LOUPE_* settings every Ray worker reads: the ones set here, and the folders as absolute paths (on a
    cluster, folders the nodes share)."""
    env = {name: value for name, value in os.environ.items() if name.startswith("LOUPE_")}
    env["LOUPE_DATA_DIR"] = str(settings.data_dir.resolve())
    env["LOUPE_WEIGHTS_DIR"] = str(settings.weights_dir.resolve())
    return env


@contextlib.contextmanager
def connected(settings: Settings, address: str | None) -> Iterator[None]:
    """Ray, for the length of the block: the cluster at `address`, or else a Ray of this machine on loopback,
    without its dashboard, its session files under the data dir (stopped with the block)."""
    runtime_env = {"env_vars": loupe_env(settings)}
    # A Ray Loupe starts reports nothing to Ray's usage-stats server unless the user asks it to; and its workers
    # keep gRPC to errors, which otherwise logs a line for each process OpenVINO's conversion forks.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address is not None:
        _join(address, runtime_env)
    else:
        temp_dir = _session_dir(settings)
        ray.init(include_dashboard=False, _temp_dir=str(temp_dir), _node_ip_address="127.0.0.1",
                 runtime_env=runtime_env, logging_level=logging.WARNING)
    if threading.current_thread() is threading.main_thread():  # ray.init put its own exit there: ours stays
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        ray.shutdown()


def _join(address: str, runtime_env: dict[str, object]) -> None:
    """Connect to the cluster at `address`, or say what stands in the way as a SettingsError."""
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as failure:
        # Ray reports a missing token only in its log, as a failure to connect.
        hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            "; a cluster with Ray's token authentication (`ray start`'s default) takes only clients with its token: "
            "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or the token in ~/.ray/auth_token) where loupe runs")
        raise SettingsError(f"could not join the Ray cluster at {address}: {failure}{hint}") from None


def _session_dir(settings: Settings) -> Path:
    """`<data dir>/ray`, unless that path is too long for Ray's Unix sockets: then a folder of its own in /tmp."""
    temp_dir = settings.data_dir.resolve() / "ray"
    if len(str(temp_dir)) > _MAX_TEMP_DIR:
        digest = hashlib.sha256(str(temp_dir).encode()).hexdigest()[:12]
        temp_dir = Path(tempfile.gettempdir()) / f"loupe-ray-{digest}"
        log.info("Ray's session files are in %s: the data dir's path is too long for its sockets", temp_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    return temp_dir


def serve_until_stopped(settings: Settings, address: str | None, replicas: int | Literal["auto"]) -> None:
    """Deploy the ingress and the Upscalers, serve at LOUPE_HOST:LOUPE_PORT, and take them down on SIGINT or
    SIGTERM (with the local Ray; on a cluster, only Loupe's application)."""
    with connected(settings, address):
        layout = plan_layout(replicas, ray.nodes(), settings)
        check_setting(settings.precision, [torch.device("cuda" if layout.gpus else "cpu")])
        # Serve's own deadline stays behind Loupe's, which answers in the OpenAI shape.
        serve.start(http_options={"host": settings.host, "port": settings.port,
                                  "request_timeout_s": settings.request_timeout_s + 30})
        previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGTERM, _stop_starting)  # SIGINT's KeyboardInterrupt does the same
        try:
            serve.run(application(settings, layout, loupe_env(settings)), name=APP, route_prefix="/")
            stop = threading.Event()
            for number in previous:
                signal.signal(number, lambda *_: stop.set())
            count = f"1 to {layout.max_replicas}" if layout.replicas == "auto" else str(layout.replicas)
            log.info("serving on Ray at http://%s:%s with %s Upscaler replicas of %s", settings.host,
                     settings.port, count, "1 GPU" if layout.gpus else f"{layout.replica_cpus} CPU")
            stop.wait()
        finally:
            if address is not None:
                serve.delete(APP)
            else:
                serve.shutdown()
            for number, handler in previous.items():
                signal.signal(number, handler)


def _stop_starting(signum: int, _frame: object) -> None:
    """A signal while the replicas start ends serve.run, and the app is taken down as on any stop."""
    raise SystemExit(128 + signum)
