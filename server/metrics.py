"""Prometheus metrics, on a registry of the app's own so that several apps can share a process."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

EngineStats = Callable[[], Mapping[str, float | int | None]]

# Upscales run from tens of milliseconds (a cached remote answer) to minutes (10K outputs on a CPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """What /metrics exposes: requests by model, provider and status, their latency, and the engine's state.

    `model` should be a catalog id (or a fixed placeholder): a label per client-typed
    string would let clients grow the series without bound.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._requests = Counter("loupe_requests", "Image requests answered, by model, provider and HTTP status",
                                 ("model", "provider", "status"), registry=self.registry)
        self._latency = Histogram("loupe_request_duration_seconds", "Time to answer an image request",
                                  ("model", "provider"), buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe_request(self, model: str, provider: str, status: int, seconds: float) -> None:
        self._requests.labels(model=model, provider=provider, status=str(status)).inc()
        self._latency.labels(model=model, provider=provider).observe(seconds)

    def watch_engine(self, stats: EngineStats) -> None:
        """Export `stats()` (queue depth and seconds, tiles, OOM retries, GPU memory) at every scrape."""
        self.registry.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for key, family, help_text in (
            ("queue_depth", GaugeMetricFamily, "Jobs waiting for or running on the engine (with --ray: on all Upscaler replicas)"),
            ("queue_seconds", GaugeMetricFamily, "Estimated seconds of work admitted and not yet done"),
            ("queue_budget_seconds", GaugeMetricFamily, "Seconds of queued work past which jobs get 429"),
            ("tiles_processed", CounterMetricFamily, "Tiles the engine has upscaled (with --ray: all Upscaler replicas)"),
            ("oom_retries", CounterMetricFamily, "Times a batch ran out of GPU memory and was retried smaller"),
            ("gpu_memory_bytes", GaugeMetricFamily, "GPU memory in use by the engine (with --ray: summed over the replicas)"),
        ):
            value = stats.get(key)
            if value is not None:
                yield family(f"loupe_{key}", help_text, value=float(value))

    def describe(self) -> Iterator[Metric]:
        # Without describe(), registering would call collect(), and so the engine, at startup.
        return iter(())
