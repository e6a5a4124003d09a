"""Prometheus metrics through prometheus_client, one registry per app.

Request counts and latency histograms are observed per route template. Everything in
``CacheService.stats()`` is exported at scrape time by a collector, so the two views can never
drift apart: every counter (``cacheservice_<name>_total``), per-tier blocks, bytes, capacity,
fill ratio and error counters, the open leases and the hit ratio since start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; lookups are index-only (tens of µs), acquire may promote from disk/Redis (ms).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
COUNTERS = {
    "hits": "blocks found by lookups and exists",
    "misses": "blocks asked for and not found",
    "stores": "new blocks stored",
    "evictions": "tier copies removed to make room",
    "dropped": "blocks and manifests that left the index for good",
    "corrupt": "blocks whose stored bytes failed their check (deleted)",
    "io_error": "reads or writes the medium failed (blocks kept)",
    "no_space": "writes refused by a full filesystem",
    "scan_removed": "broken blocks removed by the start-up scan",
    "skipped": "stored headers skipped at start-up (cycles, self-parents)",
    "refused": "blocks not stored: their edge would break the index",
    "fenced": "committed slots whose bytes were not what their writer wrote",
    "failed_reads": "reads that came back empty",
    "remote_timeouts": "shared-tier lookups past the lookup budget",
    "promotions": "blocks copied up into the host arena on a hit",
    "written_down": "blocks written down to a lower tier",
}
GAUGES = {
    "namespaces": "registered namespaces",
    "leases": "open acquire and reserve leases",
    "reserved_slots": "arena slots held by reserve leases",
    "cooling_slots": "arena slots cooling after an expired lease",
    "chunks": "position-independent chunks indexed",
}
TIER_GAUGES = {
    "blocks": ("blocks", "blocks held per tier"),
    "bytes": ("bytes_used", "bytes used per tier"),
    "capacity": ("capacity_bytes", "capacity in bytes per tier"),
}


class _StatsCollector(Collector):
    def __init__(self, stats: Callable[[], dict | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:  # not started yet
            return
        for name, text in COUNTERS.items():
            family = CounterMetricFamily(f"cacheservice_{name}", text)
            family.add_metric([], int(stats.get(name, 0)))
            yield family
        for name, text in GAUGES.items():
            yield GaugeMetricFamily(f"cacheservice_{name}", text, value=int(stats.get(name, 0)))
        asked = stats.get("hits", 0) + stats.get("misses", 0)
        yield GaugeMetricFamily(
            "cacheservice_hit_ratio",
            "hits / (hits + misses) since start",
            value=stats.get("hits", 0) / asked if asked else 0.0,
        )
        for key, (name, text) in TIER_GAUGES.items():
            family = GaugeMetricFamily(f"cacheservice_{name}", text, labels=["tier"])
            for tier, value in sorted(stats.get(key, {}).items()):
                family.add_metric([tier], int(value))
            yield family
        fill = GaugeMetricFamily("cacheservice_fill_ratio", "used / capacity", labels=["tier"])
        for tier, cap in sorted(stats.get("capacity", {}).items()):
            fill.add_metric([tier], stats["bytes"].get(tier, 0) / cap if cap else 0.0)
        yield fill
        errors = CounterMetricFamily(
            "cacheservice_tier_errors", "failures per tier and kind", labels=["tier", "kind"]
        )
        for tier, kinds in sorted(stats.get("errors", {}).items()):
            for kind, n in sorted(kinds.items()):
                errors.add_metric([tier, kind], int(n))
        yield errors


class Metrics:
    def __init__(self, stats: Callable[[], dict | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter(
            "cacheservice_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "cacheservice_request_seconds",
            "HTTP request latency by endpoint",
            ["endpoint"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StatsCollector(stats))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self._requests.labels(endpoint, str(status)).inc()
        self._latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
