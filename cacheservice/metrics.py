"""Prometheus text exposition (format 0.0.4) without a client library.

Request counters and latency histograms are kept here, per route; cache counters and tier
gauges are read from ``CacheService.stats()`` at scrape time so they never drift from it.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; lookups are index-only (tens of µs), acquire may promote from disk/Redis (ms).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
CACHE_COUNTERS = ("hits", "misses", "stores", "evictions", "corrupt")


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last = +Inf overflow
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.count += 1


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] += 1
        hist = self.latency.get(endpoint)
        if hist is None:
            hist = self.latency[endpoint] = Histogram()
        hist.observe(seconds)

    def render(self, stats: dict) -> str:
        out: list[str] = []
        _family(out, "requests_total", "counter", "HTTP requests by endpoint and status")
        for (endpoint, status), n in sorted(self.requests.items()):
            labels = _labels(endpoint=endpoint, status=status)
            out.append(f"cacheservice_requests_total{labels} {n}")
        _family(out, "request_seconds", "histogram", "HTTP request latency by endpoint")
        for endpoint, hist in sorted(self.latency.items()):
            cumulative = 0
            for bound, n in zip((*hist.buckets, float("inf")), hist.counts, strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                labels = _labels(endpoint=endpoint, le=le)
                out.append(f"cacheservice_request_seconds_bucket{labels} {cumulative}")
            labels = _labels(endpoint=endpoint)
            out.append(f"cacheservice_request_seconds_sum{labels} {hist.total!r}")
            out.append(f"cacheservice_request_seconds_count{labels} {hist.count}")
        for name in CACHE_COUNTERS:
            _family(out, f"{name}_total", "counter", f"cache {name} since start")
            out.append(f"cacheservice_{name}_total {int(stats.get(name, 0))}")
        gauges = (
            ("blocks", "blocks", "blocks held per tier"),
            ("bytes", "bytes_used", "bytes used per tier"),
            ("capacity", "capacity_bytes", "capacity in bytes per tier"),
        )
        for key, name, help_text in gauges:
            _family(out, name, "gauge", help_text)
            for tier, value in sorted(dict(stats.get(key, {})).items()):
                out.append(f"cacheservice_{name}{_labels(tier=tier)} {int(value)}")
        for key, help_text in (("namespaces", "registered namespaces"), ("leases", "open leases")):
            _family(out, key, "gauge", help_text)
            out.append(f"cacheservice_{key} {_count(stats.get(key, 0))}")
        return "\n".join(out) + "\n"


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP cacheservice_{name} {help_text}")
    out.append(f"# TYPE cacheservice_{name} {kind}")


def _labels(**labels: object) -> str:
    def esc(v: object) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


def _count(value: int | Iterable) -> int:
    return value if isinstance(value, int) else len(list(value))
