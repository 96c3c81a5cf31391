"""A Ray driver on a test's own Ray cluster that reports the cluster's Upscaler replicas (for tests/test_ray.py).

Run as `python -m tests.ray_replicas ADDRESS` with the cluster's environment (its auth token). Each line read from
stdin asks for one report, written to stdout as one JSON line: a list of {"name", "pid", "ongoing"}, one for each
Upscaler replica the cluster knows by name, "pid" and "ongoing" (the requests it holds) null for a replica that has not
answered (still starting, or just killed); or, for the line "tiles", {replica id: tiles its device has run}. End of
input ends it.

The replicas are asked themselves, through the actor methods Serve's own router and controller call, so a report is
of this cluster alone, and a request counts once the replica holding it has taken it.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

NAMESPACE = "serve"  # Serve's actors' namespace
PREFIX = "SERVE_REPLICA::loupe#Upscaler#"  # a replica's actor name: app#deployment#its id
_ANSWER_S = 30.0  # for one replica's answer: past it, this report says it did not answer, and the next asks again


def report() -> list[dict[str, Any]]:
    names = sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                   if actor["namespace"] == NAMESPACE and actor["name"].startswith(PREFIX))
    replicas = []
    for name in names:
        pid = ongoing = None
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            pid = ray.get(actor.is_allocated.remote(), timeout=_ANSWER_S)[0]
            ongoing = ray.get(actor.get_num_ongoing_requests.remote(), timeout=_ANSWER_S)
        except (ValueError, GetTimeoutError, RayError):  # gone, dead, or not answering yet
            pid = ongoing = None
        replicas.append({"name": name, "pid": pid, "ongoing": ongoing})
    return replicas


def tiles() -> dict[str, int]:
    """Each Upscaler replica's tiles run on its device so far, by its replica id: from the counters a job's result
    carries, for tiny jobs sent straight to the replicas (not through the ingress) until each has answered one. A
    replica runs its jobs one after another on its device, so its answer comes after every job it had before."""
    from ray import serve

    from tests.fake_upstreams import make_job

    handle = serve.get_deployment_handle("Upscaler", app_name="loupe").options(stream=True)
    expected = len([actor for actor in ray.util.list_named_actors(all_namespaces=True)
                    if actor["namespace"] == NAMESPACE and actor["name"].startswith(PREFIX)])
    seen: dict[str, int] = {}
    for _ in range(200):  # the router picks a replica at random: 200 tries miss one of two with odds of 2**-200
        for item in handle.run.remote(make_job("realesr-animevideov3", scale=2)):
            if hasattr(item, "stats"):
                seen[item.replica] = int(item.stats["tiles_processed"])
        if len(seen) >= expected:
            break
    return seen


def main(address: str) -> None:
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        for line in sys.stdin:
            print(json.dumps(tiles() if line.strip() == "tiles" else report()), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
