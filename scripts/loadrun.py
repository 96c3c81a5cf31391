"""A bounded load run against a Loupe server on loopback: many clients mixing good, bad and cancelled requests.

    python -m scripts.loadrun --requests 400 --clients 24

It starts `loupe serve` (CPU, animevideov3) in a child process and measures that process's RSS.
Every request is accounted for: served (200 with a valid image), refused (4xx on purpose, or 429 under load),
cancelled by the client, lost (no answer, or a 200 without a valid image: must be 0) and 5xx (must be 0).
Its markdown table goes to stdout, for docs/reliability.md.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil
from PIL import Image

KINDS = ("good", "good", "good", "bad", "cancel")


def _png(width: int, height: int, seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(width * height)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class LoadReport:
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    retried: int = 0
    retry_after: list[float] = field(default_factory=list)  # what each 429 said
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        return self.outcomes["lost"]

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)


async def _one(client: httpx.AsyncClient, url: str, kind: str, index: int, report: LoadReport,
               retry_busy: bool, size: tuple[int, int] | None) -> None:
    width, height = size or (24 + index % 3 * 8,) * 2
    image = _png(width, height, index)
    fields = {"model": "realesr-animevideov3", "scale_factor": "2", "response_format": "b64_json"}
    if kind == "bad":
        fields["scale_factor"] = random.choice(["0", "NaN", "-1", "abc"])
    timeout = httpx.Timeout(0.05 if kind == "cancel" else 120)
    report.sent += 1
    try:
        while True:
            response = await client.post(f"{url}/v1/images/edits", data=fields, files={"image": ("a.png", image)},
                                         timeout=timeout)
            if response.status_code == 429:
                report.retry_after.append(float(response.headers.get("retry-after", "0")))
            if not (retry_busy and response.status_code == 429):
                break
            report.retried += 1  # a polite client: wait as told, then try again
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
    except httpx.TimeoutException:
        report.outcomes["cancelled" if kind == "cancel" else "lost"] += 1
        return
    except httpx.HTTPError:
        report.outcomes["lost"] += 1
        return
    report.statuses[response.status_code] += 1
    if response.status_code == 200:
        body = response.json()
        decoded = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
        report.outcomes["served" if decoded.size == (width * 2, height * 2) else "lost"] += 1
    elif response.status_code < 500:
        report.outcomes["refused"] += 1
    else:
        report.outcomes["5xx"] += 1


async def run_load(url: str, *, clients: int, requests: int, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                   retry_busy: bool = False, size: tuple[int, int] | None = None) -> LoadReport:
    """`size`: every image's (None: 24 to 40 px squares); each is upscaled 2x with animevideov3."""
    rng = random.Random(seed)
    report = LoadReport()
    work = [(rng.choice(kinds), i) for i in range(requests)]
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)

    async def client_loop() -> None:
        async with httpx.AsyncClient() as client:
            while not queue.empty():
                kind, index = queue.get_nowait()
                await _one(client, url, kind, index, report, retry_busy, size)

    started = time.monotonic()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    report.seconds = time.monotonic() - started
    return report


def _markdown(report: LoadReport, args: argparse.Namespace, rss_growth: float) -> str:
    today = datetime.date.today().isoformat()
    return (
        "# Reliability: a bounded load run\n\n"
        f"Command: `python -m scripts.loadrun --requests {args.requests} --clients {args.clients}"
        f"{' --retry-busy' if args.retry_busy else ''} --max-queue-s {args.max_queue_s:g}`  \n"
        f"Date: {today}; device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        "model realesr-animevideov3, 24–40 px inputs at 2x, LOUPE_MAX_QUEUE_S "
        f"{args.max_queue_s:g}.\n\n"
        "| sent | served | refused (4xx) | cancelled by client | lost | 5xx | RSS start | RSS end | growth | seconds |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {report.sent} | {report.outcomes['served']} | {report.outcomes['refused']} | {report.outcomes['cancelled']} "
        f"| {report.lost} | {report.server_errors} | {report.rss_start_mb:.0f} MB | {report.rss_end_mb:.0f} MB "
        f"| {rss_growth:+.1%} | {report.seconds:.0f} |\n\n"
        f"Final statuses: {dict(sorted(report.statuses.items()))}; 429s waited out and retried: {report.retried}. "
        "RSS is the server process's, measured after a warm-up of 20 requests and again at the end.\n"
    )


def _start_server(port: int, data_dir: str, max_queue_s: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LOUPE_DEVICE": "cpu", "LOUPE_DATA_DIR": data_dir, "LOUPE_MAX_QUEUE_S": str(max_queue_s),
           "LOUPE_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("loupe serve did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--max-queue-s", type=float, default=2.0, help="LOUPE_MAX_QUEUE_S for the server")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--retry-busy", action="store_true", help="clients wait and retry on 429, as the SDK does")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as data_dir:
        server = _start_server(args.port, data_dir, args.max_queue_s)
        url = f"http://127.0.0.1:{args.port}"
        try:
            asyncio.run(run_load(url, clients=4, requests=20, seed=1))
            process = psutil.Process(server.pid)
            rss_start = process.memory_info().rss / 2**20
            report = asyncio.run(run_load(url, clients=args.clients, requests=args.requests,
                                          retry_busy=args.retry_busy))
            report.rss_start_mb, report.rss_end_mb = rss_start, process.memory_info().rss / 2**20
            alive = httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        finally:
            server.terminate()
            server.wait(timeout=60)
    growth = report.rss_end_mb / report.rss_start_mb - 1
    print(report, "server alive at the end:", alive, file=sys.stderr)
    print(_markdown(report, args, growth))


if __name__ == "__main__":
    main()
