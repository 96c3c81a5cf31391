"""Loupe on Ray, as a user runs it: `loupe serve --ray` and `loupe upscale --ray` on a local Ray of this machine.

The server runs 2 CPU Upscaler replicas of 1 CPU each behind the one ingress, with LOUPE_RAY_QUEUE=2: each replica
holds two jobs, the ingress two more, and the next is refused. Every request is sent to 127.0.0.1.
"""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from scripts.bench import wait_until_serving
from server import errors
from server.cluster.layout import plan_layout
from server.config import SettingsError
from tests import photos
from tests.conftest import loupe_settings
from tests.servers import free_port, serve


TILE = 64  # a job stops at its next tile when its client goes; both servers tile alike, so their pixels compare
ENV = {"LOUPE_DEVICE": "cpu", "LOUPE_COMPILE": "0", "LOUPE_TILE_SIZE": str(TILE), "LOUPE_RAY_QUEUE": "2"}


def _env(weights_dir: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("LOUPE_")}
    # Ray runs its workers (Serve's controller and proxy, the replicas, Ray Data's tasks) at nice 15: on a machine
    # whose CPUs are busy (CI runs the tests beside `stress-ng --cpu 2`) they get a few per cent of a core, and take
    # minutes to start. At nice 0 they take their share like any process.
    return {**clean, **ENV, "LOUPE_WEIGHTS_DIR": str(weights_dir), "LOUPE_DATA_DIR": str(data_dir),
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0", **extra}


def _short_dir() -> Path:
    """A data dir with a short path: Ray keeps its sockets under it."""
    return Path(tempfile.mkdtemp(prefix="loupe-ray-test-", dir="/tmp"))


@dataclass(frozen=True)
class Cluster:
    address: str
    env: dict[str, str]  # a client's, with the cluster's token
    data_dir: Path


@pytest.fixture(scope="module")
def cluster(weights_dir: Path) -> Iterator[Cluster]:
    """A Ray cluster of this machine, started as the README starts a head node, with Ray's token authentication.

    (`loupe upscale --ray`'s tests take the other way in: a Ray of this machine that Loupe starts itself.)"""
    data_dir = _short_dir()
    env = _env(weights_dir, data_dir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex,
               # Serve's controller gives its HTTP proxy 5 s to come up (10 s per health check) before it kills it
               # and starts another, which fails a `serve.start` waiting on the first: too short for a loaded machine.
               RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="120", RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S="120")
    ray_port = free_port()
    ray_cli = str(Path(sys.executable).parent / "ray")
    started = Cluster(f"127.0.0.1:{ray_port}", env, data_dir)
    try:  # a start that fails halfway is stopped too
        # Every port of its own: Ray's fixed defaults would meet any other Ray of this machine.
        ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "ray-client-server-port", "metrics-export-port",
                                                         "runtime-env-agent-port")]
        subprocess.run([ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ray_port),
                        "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", *ports,
                        "--temp-dir", str(data_dir / "cluster")], env=env, check=True, capture_output=True,
                       timeout=120)
        yield started
        status = subprocess.run([ray_cli, "status", "--address", f"127.0.0.1:{ray_port}"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr  # Loupe left; the cluster stays
    finally:
        _stop(started)  # not `ray stop`: that stops every Ray of this machine, not only this one
        shutil.rmtree(data_dir, ignore_errors=True)


def _processes_of(cluster: Cluster) -> set[int]:
    """The live processes of `cluster`, and of no other Ray: each has the cluster's token in its environment (`ray
    start` gave it to the head's processes, and they to the workers they start), or a file open under the cluster's
    own temp dir (Ray's processes log there; some write their long process title over their environment)."""
    mark = f"RAY_AUTH_TOKEN={cluster.env['RAY_AUTH_TOKEN']}".encode()
    under = f"{cluster.data_dir}/"
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = (entry / "environ").read_bytes()  # empty for a zombie: it holds nothing any more
            descriptors = list((entry / "fd").iterdir())
        except OSError:  # gone meanwhile, or another user's
            continue
        if mark in environment.split(b"\0") or any(_target(fd).startswith(under) for fd in descriptors):
            found.add(int(entry.name))
    return found


def _target(link: Path) -> str:
    try:
        return os.readlink(link)
    except OSError:  # closed meanwhile
        return ""


def _stop(cluster: Cluster) -> None:
    """`ray stop --force` for this cluster alone: SIGKILL each of its processes, until none is left (a raylet may
    start a worker meanwhile)."""
    deadline = time.monotonic() + 120
    while pids := _processes_of(cluster):
        assert time.monotonic() < deadline, f"the test's Ray processes {sorted(pids)} outlived SIGKILL"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)  # a polling interval: the loop ends when the processes are gone, not after a time


@pytest.fixture(scope="module")
def ray_url(cluster: Cluster) -> Iterator[str]:
    """`loupe serve --ray --address ADDR --replicas 2` on the cluster, ready."""
    port = free_port()
    log_path = cluster.data_dir / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--ray", "--address", cluster.address,
                                   "--replicas", "2", "--port", str(port)],
                                  env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server, 300, "/readyz", log_path)  # a deadline for a loaded machine, not a wait
        yield url
        server.send_signal(signal.SIGTERM)  # Loupe's application leaves the cluster
        assert server.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()


@pytest.fixture(scope="module")
def local_url(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same settings served by one process."""
    from server.app import create_app

    settings = loupe_settings(weights_dir, tmp_path_factory.mktemp("local-data"), tile_size=TILE)
    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The local engine on one thread, as each replica runs: the same kernels, so the same rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def _sdk(url: str) -> openai.OpenAI:
    # Retries as the SDK's users have them: jobs sent at once may find the queue full for a moment (429).
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=4, timeout=300)


def _edit(url: str, model: str, image: bytes, scale: float, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/edits", data={"model": model, "scale_factor": str(scale)},
                      files={"image": ("photo.png", image)}, timeout=timeout)


# A job of a fraction of a second.
SHORT = ("realesr-animevideov3", _png(photos.astronaut((48, 48))), 2)


@pytest.mark.slow
def test_the_sdk_through_ray_gets_the_pixels_of_a_local_run(ray_url: str, local_url: str, one_thread: None) -> None:
    jobs = [("realesr-animevideov3", photos.astronaut((96, 72)), 2.5), ("realesrgan-x4plus", photos.chelsea((60, 40)), 2),
            ("realesrgan-x4plus-anime", photos.coffee((40, 40)), 4)]

    def run(url: str, job: tuple[str, np.ndarray, float]) -> tuple[np.ndarray, dict[str, object]]:
        model, pixels, scale = job
        result = _sdk(url).images.edit(model=model, image=("photo.png", _png(pixels)), prompt="",
                                       response_format="b64_json", extra_body={"scale_factor": scale})
        assert result.data is not None and result.data[0].b64_json is not None
        return _pixels(base64.b64decode(result.data[0].b64_json)), result.model_extra["metadata"]

    with ThreadPoolExecutor(len(jobs)) as pool:
        on_ray = list(pool.map(lambda job: run(ray_url, job), jobs))
    for job, (pixels, metadata) in zip(jobs, on_ray):
        local_pixels, local_metadata = run(local_url, job)
        assert np.array_equal(pixels, local_pixels), job[0]
        assert metadata["executed_model"] == local_metadata["executed_model"]
        assert metadata["provider"] == "local" and metadata["provider_name"] == "Loupe (Ray Serve, CPU)"

    by_url = _sdk(ray_url).images.edit(model="realesr-animevideov3", image=("photo.png", _png(jobs[0][1])), prompt="",
                                       extra_body={"scale_factor": 2.5})
    assert by_url.data is not None and by_url.data[0].url is not None
    assert np.array_equal(_pixels(httpx.get(by_url.data[0].url).content), on_ray[0][0])


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} metric")


@pytest.mark.slow
def test_tile_progress_streams_back_from_the_replica_and_metrics_count_it(ray_url: str) -> None:
    tiles_before = _metric(ray_url, "loupe_tiles_processed_total")
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(lambda: httpx.post(
            f"{ray_url}/v1/images/edits", headers={"X-Request-Id": "ray-progress-1"},
            data={"model": "realesr-animevideov3", "scale_factor": "4"},
            files={"image": ("photo.png", _png(photos.coffee((400, 400))))}, timeout=300))
        events = []
        deadline = time.monotonic() + 60
        while not events and time.monotonic() < deadline:  # the stream opens once the request is in
            with httpx.stream("GET", f"{ray_url}/v1/progress/ray-progress-1", timeout=60) as stream:
                if stream.status_code == 200:
                    events = [json.loads(line.removeprefix("data: ")) for line in stream.iter_lines() if line]
        assert job.result().status_code == 200
    tiles = [event for event in events if event["stage"] == "running" and event["total"]]
    # The counts stream as they change (a watcher may see several at once as one), their total the job's own.
    assert len({event["done"] for event in tiles}) >= 2 and {event["total"] for event in tiles} == {49}  # 7 × 7
    assert [event["done"] for event in tiles] == sorted(event["done"] for event in tiles)
    assert events[-1]["stage"] == "done"
    assert _metric(ray_url, "loupe_tiles_processed_total") - tiles_before == 49
    assert _metric(ray_url, "loupe_queue_depth") == 0


BAD = {
    "an unknown model": ({"model": "no-such-model"}, _png(photos.astronaut((32, 32)))),
    "a negative scale": ({"model": "realesr-animevideov3", "scale_factor": "-2"}, _png(photos.astronaut((32, 32)))),
    "text as the image": ({"model": "realesr-animevideov3"}, b"this is not an image"),
    # The header is whole, the pixels are cut: only the replica's full decode finds out.
    "a truncated PNG": ({"model": "realesr-animevideov3"}, _png(photos.coffee((64, 64)))[:400]),
    "an output past the limit": ({"model": "realesrgan-x4plus", "scale_factor": "400"}, _png(photos.coffee((64, 64)))),
}


@pytest.mark.slow
def test_bad_input_through_ray_gets_exactly_the_local_4xx(ray_url: str, local_url: str) -> None:
    for name, (fields, image) in BAD.items():
        answers = [httpx.post(f"{url}/v1/images/edits", data=fields, files={"image": ("photo.png", image)},
                              timeout=60) for url in (ray_url, local_url)]
        on_ray, local = answers
        assert 400 <= local.status_code < 500, name
        assert on_ray.status_code == local.status_code, (name, on_ray.text)
        assert on_ray.json() == local.json(), name
        assert on_ray.headers.get("x-should-retry") == local.headers.get("x-should-retry"), name


@dataclass(frozen=True)
class Replica:
    """An Upscaler replica, as it reported itself: its process and the requests it holds (None: no answer yet)."""

    name: str
    pid: int | None
    ongoing: int | None


class Replicas:
    """The cluster's Upscaler replicas, as the replicas themselves report them to a driver on this cluster alone
    (tests/ray_replicas.py, a process of this test's own)."""

    def __init__(self, cluster: Cluster) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "tests.ray_replicas", cluster.address],
                                        env=cluster.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def report(self) -> list[Replica]:
        return [Replica(**replica) for replica in self._ask("report")]

    def tiles(self) -> dict[str, int]:
        """Each replica's tiles run on its device so far, once every job it holds has ended."""
        return dict(self._ask("tiles"))

    def _ask(self, question: str) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{question}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the replica reporter ended ({self.process.wait()})"
        return json.loads(line)

    def wait_until(self, ready: Callable[[list[Replica]], bool], what: str, timeout: float = 180) -> list[Replica]:
        """The first report that is `ready`, asking again until `timeout` s have gone by."""
        deadline = time.monotonic() + timeout
        while not ready(replicas := self.report()):
            assert time.monotonic() < deadline, f"no {what} in {timeout} s: {replicas}"
            time.sleep(0.05)  # a polling interval, not a wait for anything
        return replicas

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # its end of input: it leaves the cluster and ends
        try:
            self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def replicas(cluster: Cluster, ray_url: str) -> Iterator[Replicas]:
    watch = Replicas(cluster)
    try:
        yield watch
    finally:
        watch.close()


def _holding(replicas: list[Replica]) -> list[int]:
    """The requests each replica that answered holds, fewest first."""
    return sorted(replica.ongoing for replica in replicas if replica.ongoing is not None)


def _pids(replicas: list[Replica]) -> set[int]:
    return {replica.pid for replica in replicas if replica.pid is not None}


# A job of 49 tiles (400² in 64-px tiles, ×4): seconds on one replica's CPU, so two of them keep a replica busy.
HELD = ("realesr-animevideov3", _png(photos.coffee((400, 400))), 4)
HELD_TILES = 49


def _hold(pool: ThreadPoolExecutor, url: str, replicas: Replicas,
          count: int) -> tuple[list[Future[httpx.Response]], list[Replica]]:
    """`count` HELD jobs, sent one at a time, each held by a replica before the next is sent (Serve refuses jobs that
    arrive at once past LOUPE_RAY_QUEUE): the jobs, and the replicas' report once they hold them all, with none
    answered yet and the jobs under way far from their end, so that none ends before what the caller does next."""
    replicas.wait_until(lambda found: len(found) == 2 and _holding(found) == [0, 0], "two idle replicas")
    tiles_before = _metric(url, "loupe_tiles_processed_total")
    jobs: list[Future[httpx.Response]] = []

    def held(sent: int) -> Callable[[list[Replica]], bool]:
        def ready(found: list[Replica]) -> bool:
            answered = [future.result() for future in jobs if future.done()]
            assert not answered, [answer.text for answer in answered]
            return sum(_holding(found)) == sent
        return ready

    for sent in range(1, count + 1):
        jobs.append(pool.submit(_edit, url, *HELD, timeout=540))  # two after another on a loaded CPU: minutes
        holding = replicas.wait_until(held(sent), f"replicas holding {sent} jobs")
    # A replica runs one job at a time: the tiles done so far are of the jobs under way, none of them near its end.
    tiles = _metric(url, "loupe_tiles_processed_total") - tiles_before
    assert tiles <= HELD_TILES - 10, f"{tiles} tiles already done"
    return jobs, holding


@pytest.mark.slow
def test_a_full_queue_answers_429_with_retry_after(ray_url: str, replicas: Replicas) -> None:
    with ThreadPoolExecutor(8) as pool:
        running, holding = _hold(pool, ray_url, replicas, 4)
        assert _holding(holding) == [2, 2]  # two jobs in each replica, the most each holds
        more = list(pool.map(lambda _: _edit(ray_url, *SHORT), range(4)))  # of these, the ingress holds two
        answers = [job.result() for job in running] + more
    assert sorted(answer.status_code for answer in answers) == [200] * 6 + [429] * 2, [a.text for a in answers]
    for answer in answers:
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
            assert answer.headers["x-should-retry"] == "true"  # worth retrying: the SDK does, after Retry-After
            error = answer.json()["error"]
            assert error["code"] == "RATE_LIMITED" and "LOUPE_RAY_QUEUE" in error["message"]


def _request_bytes(url: str, model: str, image: bytes, scale: float) -> bytes:
    """An edit as the bytes a client sends, so that a test can send it on a socket and hang up."""
    request = httpx.Request("POST", f"{url}/v1/images/edits", data={"model": model, "scale_factor": str(scale)},
                            files={"image": ("photo.png", image)})
    head = [f"POST {request.url.raw_path.decode()} HTTP/1.1", f"Host: {request.url.netloc.decode()}",
            *(f"{name}: {value}" for name, value in request.headers.items() if name.lower() != "host")]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + request.read()


@pytest.mark.slow
def test_clients_that_hang_up_free_the_replicas(ray_url: str, replicas: Replicas) -> None:
    replicas.wait_until(lambda found: len(found) == 2 and _holding(found) == [0, 0], "two idle replicas")
    before = replicas.tiles()
    sent = _request_bytes(ray_url, *HELD)
    host, port = ray_url.removeprefix("http://").split(":")
    clients: list[socket.socket] = []
    try:
        for count in range(1, 5):  # two in each replica, the most each holds; each held before the next is sent
            clients.append(socket.create_connection((host, int(port)), timeout=60))
            clients[-1].sendall(sent)
            replicas.wait_until(lambda found, count=count: sum(_holding(found)) == count, f"{count} jobs held")
    finally:
        for client in clients:  # every client hangs up, its job under way
            client.close()
    replicas.wait_until(lambda found: _holding(found) == [0, 0], "the hung-up jobs to leave the replicas")
    after = replicas.tiles()  # each replica answers it after whatever ran on its device before
    assert set(after) == set(before)
    ran = {replica: after[replica] - before[replica] for replica in after}
    # Had the four jobs gone on, each replica's device would have run two of them, 2 × HELD_TILES tiles.
    assert all(tiles < HELD_TILES for tiles in ran.values()), ran
    assert _edit(ray_url, *SHORT).status_code == 200


@pytest.mark.slow
def test_a_killed_replica_fails_only_its_own_jobs(ray_url: str, cluster: Cluster, replicas: Replicas) -> None:
    with ThreadPoolExecutor(4) as pool:
        jobs, holding = _hold(pool, ray_url, replicas, 4)
        assert _holding(holding) == [2, 2]  # two jobs in each replica, the most each holds
        pids = sorted(_pids(holding))
        assert len(pids) == 2 and set(pids) <= _processes_of(cluster)  # this cluster's own replicas, no other Ray's
        os.kill(pids[0], signal.SIGKILL)
        answers = sorted((job.result() for job in jobs), key=lambda answer: answer.status_code)
    assert [answer.status_code for answer in answers] == [200, 200, 503, 503], [a.text for a in answers]
    for survived in answers[:2]:
        assert survived.json()["size"] == "1600x1600"
    for lost in answers[2:]:
        assert lost.json()["error"]["code"] == "REPLICA_LOST" and "again" in lost.json()["error"]["message"]
        assert lost.headers["x-should-retry"] == "true"  # a retry goes to a live replica
    assert _edit(ray_url, *SHORT).status_code == 200
    # And Serve brings the replica back: two replicas that answer, the killed one not among them.
    back = replicas.wait_until(lambda found: len(found) == 2 and len(_holding(found)) == 2, "two replicas again")
    assert pids[0] not in _pids(back) and pids[1] in _pids(back) and _pids(back) <= _processes_of(cluster)


@pytest.mark.slow
def test_joining_a_cluster_without_its_token_says_how_to_give_it(cluster: Cluster) -> None:
    env = {name: value for name, value in cluster.env.items() if not name.startswith("RAY_AUTH")}
    refused = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--ray", "--address", cluster.address,
                              "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "RAY_AUTH_MODE=token" in refused.stderr and cluster.address in refused.stderr


def test_without_ray_installed_ray_says_how_to_install_it(tmp_path: Path, weights_dir: Path) -> None:
    hidden = tmp_path / "no-ray" / "ray"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    env = {**_env(weights_dir, tmp_path / "data"), "PYTHONPATH": str(hidden.parent)}
    for command in (["serve", "--ray"], ["upscale", str(tmp_path), "-o", str(tmp_path / "out"), "--ray"]):
        done = subprocess.run([sys.executable, "-m", "server.cli", *command], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2
        assert "pip install -e '.[ray]'" in done.stderr


def test_every_domain_error_crosses_to_the_ingress_whole() -> None:
    raised = [errors.QueueFull("busy", retry_after_s=3), errors.ModelUnavailable("gone", code="WEIGHTS_CORRUPT"),
              errors.ShuttingDown("stopping"), errors.UpstreamRejected(413, "too big", "image"),
              errors.InvalidInput("odd", "image"), errors.OutOfDeviceMemory("cuda:0", transient=True)]
    for error in raised:
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error) and vars(back) == vars(error)


def _nodes(*resources: dict[str, float]) -> list[dict[str, object]]:
    return [{"Alive": True, "Resources": node} for node in resources] + [{"Alive": False, "Resources": {"GPU": 8}}]


@pytest.mark.parametrize(("nodes", "device", "replicas", "expected"), [
    (_nodes({"CPU": 16, "GPU": 4}), "auto", "auto", (4, True, {"num_gpus": 1, "num_cpus": 4})),
    (_nodes({"CPU": 16, "GPU": 4}), "auto", 2, (2, True, {"num_gpus": 1, "num_cpus": 4})),
    # A head of many CPUs and no GPU gives the GPU replicas no more CPUs than the GPU nodes have.
    (_nodes({"CPU": 64}, {"CPU": 4, "GPU": 2}), "auto", "auto", (2, True, {"num_gpus": 1, "num_cpus": 2})),
    (_nodes({"CPU": 16, "GPU": 4}), "cpu", "auto", (8, False, {"num_cpus": 2})),  # LOUPE_DEVICE=cpu: no GPUs
    (_nodes({"CPU": 2}), "auto", "auto", (1, False, {"num_cpus": 2})),
    (_nodes({"CPU": 3}, {"CPU": 3}), "auto", 2, (2, False, {"num_cpus": 2})),  # one on each node
])
def test_each_engine_takes_a_whole_gpu_or_its_cpus(nodes: list[dict[str, object]], device: str,
                                                    replicas: int | str, expected: tuple[object, ...],
                                                    tmp_path: Path) -> None:
    settings = loupe_settings(tmp_path, tmp_path, device=device, ray_replica_cpus=2)
    layout = plan_layout(replicas, nodes, settings)  # type: ignore[arg-type]
    assert (layout.max_replicas, layout.gpus, layout.resources) == expected


@pytest.mark.parametrize(("nodes", "replicas"), [(_nodes({"CPU": 2}), 2), (_nodes({"CPU": 1}), "auto"),
                                                 (_nodes({"CPU": 8, "GPU": 1}), 2)])
def test_replicas_the_cluster_cannot_place_are_refused_before_anything_deploys(
        nodes: list[dict[str, object]], replicas: int | str, tmp_path: Path) -> None:
    settings = loupe_settings(tmp_path, tmp_path, device="auto", ray_replica_cpus=2)
    with pytest.raises(SettingsError, match="don't fit in this Ray cluster"):
        plan_layout(replicas, nodes, settings)  # type: ignore[arg-type]
