"""Loupe on Ray Serve against plain `loupe serve`: throughput of concurrent requests, and the cost per request.

    python -m scripts.bench_ray --write docs/benchmarks.md

Each contender is a real server on 127.0.0.1, started as a user starts it, on one data dir:

- plain-1cpu: `loupe serve` with torch on one thread (OMP_NUM_THREADS=1), the twin of one replica;
- plain-2cpu: `loupe serve` as it runs by default on this machine (torch on every core);
- ray-1: `loupe serve --ray --replicas 1`, one Upscaler replica of 1 CPU (torch's threads = its num_cpus);
- ray-2: `loupe serve --ray --replicas 2`, two replicas of 1 CPU each.

Per contender: a warm-up request, then `--requests` concurrent edits of a 256² photo at 2× with animevideov3
(their wall time, as images/s), then `--sequential` edits of a 64² photo one after another (the median latency:
what serving costs a request beyond its model run). Servers start and stop in rounds, the contenders' order
rotated each round, and each figure is the median over the rounds. LOUPE_COMPILE=0 everywhere, so that no
background OpenVINO conversion runs during a measurement.
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import skimage.data
import torch
from PIL import Image

from scripts.bench import WEIGHTS_DIR, _cpu_flags, _device_name, _revision, append_section, wait_until_serving

MODEL = "realesr-animevideov3"
CONTENDERS = {
    "plain-1cpu": (["serve"], {"OMP_NUM_THREADS": "1"}),
    "plain-2cpu": (["serve"], {}),
    "ray-1": (["serve", "--ray", "--replicas", "1"], {}),
    "ray-2": (["serve", "--ray", "--replicas", "2"], {}),
}


@dataclass
class Figures:
    images_per_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)


def _png(size: int) -> bytes:
    photo = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _server(args: list[str], env: dict[str, str], data_dir: Path, log: Path) -> Iterator[str]:
    port = _free_port()
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}, "LOUPE_DEVICE": "cpu",
                "LOUPE_COMPILE": "0", "LOUPE_WEIGHTS_DIR": str(WEIGHTS_DIR), "LOUPE_DATA_DIR": str(data_dir),
                "LOUPE_RAY_QUEUE": "64", **env}
    with log.open("w") as output:
        server = subprocess.Popen([sys.executable, "-m", "server.cli", *args, "--port", str(port)], env=full_env,
                                  stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server, 300, "/readyz", log)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _edit(client: httpx.Client, url: str, image: bytes) -> None:
    answer = client.post(f"{url}/v1/images/edits", data={"model": MODEL, "scale_factor": "2",
                                                         "response_format": "b64_json"},
                         files={"image": ("photo.png", image)}, timeout=600)
    if answer.status_code != 200:
        raise RuntimeError(f"{answer.status_code}: {answer.text[:300]}")


def measure(url: str, requests: int, sequential: int, size: int) -> tuple[float, float]:
    """(images/s for `requests` concurrent edits of a size² photo, median latency of small edits one at a time)."""
    big, small = _png(size), _png(64)
    with httpx.Client() as client:
        _edit(client, url, big)  # warm-up: the model loads (on every replica, with the concurrent burst)
        with ThreadPoolExecutor(requests) as pool:
            list(pool.map(lambda _: _edit(client, url, big), range(min(requests, 4))))
        began = time.perf_counter()
        with ThreadPoolExecutor(requests) as pool:
            list(pool.map(lambda _: _edit(client, url, big), range(requests)))
        throughput = requests / (time.perf_counter() - began)
        latencies = []
        for _ in range(sequential):
            began = time.perf_counter()
            _edit(client, url, small)
            latencies.append(time.perf_counter() - began)
    return throughput, statistics.median(latencies)


def bench(args: argparse.Namespace, scratch: Path) -> dict[str, Figures]:
    figures = {name: Figures() for name in CONTENDERS}
    names = list(CONTENDERS)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            command, env = CONTENDERS[name]
            with _server(command, env, scratch / "data", scratch / f"{name}.log") as url:
                throughput, latency = measure(url, args.requests, args.sequential, args.size)
            figures[name].images_per_s.append(throughput)
            figures[name].latency_s.append(latency)
            print(f"round {round_ + 1}: {name} {throughput:.2f} images/s, {latency * 1000:.0f} ms per small edit",
                  file=sys.stderr)
    return figures


def report(figures: dict[str, Figures], args: argparse.Namespace, command: str) -> str:
    today = datetime.date.today().isoformat()
    rate = {name: statistics.median(f.images_per_s) for name, f in figures.items()}
    latency = {name: statistics.median(f.latency_s) for name, f in figures.items()}
    what = {
        "plain-1cpu": "`loupe serve`, torch on 1 thread",
        "plain-2cpu": "`loupe serve`, torch on every core",
        "ray-1": "`loupe serve --ray --replicas 1`: 1 replica of 1 CPU",
        "ray-2": "`loupe serve --ray --replicas 2`: 2 replicas of 1 CPU",
    }
    lines = [
        f"## {today}: CPU, Ray Serve against plain serving: {args.requests} concurrent {args.size}² → "
        f"{args.size * 2}² animevideov3 edits",
        "",
        f"Command: `{command}`  ",
        f"Date: {today}; device: {_device_name(torch.device('cpu'))}; torch {torch.__version__}, Loupe "
        f"{_revision()}  ",
        f"CPU flags: {_cpu_flags()}  ",
        f"Every contender is a real server on 127.0.0.1 (LOUPE_COMPILE=0), warmed up, then sent {args.requests} "
        f"edits at once (b64_json), then {args.sequential} edits of a 64² photo one at a time. {args.rounds} rounds, "
        "each starting every server afresh in an order rotated each round; the medians. The machine is shared "
        "and noisy, which is why the contenders alternate: read the ratios.",
        "",
        "| contender | what it is | images/s (median) | × ray-1 | per small edit, ms (median) | runs, images/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in figures.items():
        runs = ", ".join(f"{value:.2f}" for value in row.images_per_s)
        lines.append(f"| {name} | {what[name]} | {rate[name]:.2f} | {rate[name] / rate['ray-1']:.2f}× | "
                     f"{latency[name] * 1000:.0f} | {runs} |")
    lines += [
        "",
        f"- Scale-out: 2 replicas give **{rate['ray-2'] / rate['ray-1']:.2f}×** the throughput of 1 (goal ≥ 1.6×).",
        f"- Serve against plain serving at one CPU: plain-1cpu is **{rate['plain-1cpu'] / rate['ray-1']:.2f}×** "
        f"ray-1's throughput (goal ≤ 1.15×); a small edit costs {1000 * (latency['ray-1'] - latency['plain-1cpu']):.0f}"
        " ms more through Serve (its proxy, the ingress replica, and the handle call to the Upscaler).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=16, help="concurrent edits per measurement")
    parser.add_argument("--size", type=int, default=256, help="side of the square photo each edit sends")
    parser.add_argument("--sequential", type=int, default=10, help="small edits one at a time, for the latency")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every contender (the median is reported)")
    parser.add_argument("--write", type=Path, help="append the results as a dated markdown section to this file")
    args = parser.parse_args(argv)
    if min(args.requests, args.size, args.sequential, args.rounds) < 1:
        parser.error("--requests, --size, --sequential and --rounds must be at least 1")
    command = " ".join(["python -m scripts.bench_ray", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()
    # A short path: Ray keeps its sockets under the data dir.
    with tempfile.TemporaryDirectory(prefix="loupe-bench-ray-", dir="/tmp") as scratch:
        figures = bench(args, Path(scratch))
    text = report(figures, args, command)
    print(text)
    if args.write is not None:
        append_section(args.write, text)


if __name__ == "__main__":
    main()
