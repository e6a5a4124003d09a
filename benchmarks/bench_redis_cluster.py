"""The Redis Cluster tier against ``redis-benchmark --cluster`` on the same throwaway cluster
(3 masters on loopback), 2 MiB and 32 MiB values, medians of interleaved repetitions:

    python -m benchmarks.bench_redis_cluster [--reps 3] [--gib 0.25]

Prints GiB/s of put_many / get_many through RedisClusterTier (checksums verified on every
read) on its zero-copy slot-routed path and on redis-py's cluster pipeline (its fallback for
TLS and MOVED), and of redis-benchmark's SET / GET with the same value size and one client, and
the ratios (goal: >= 0.8x). All move the same bytes to the same nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.tier_duel import GIB, make_items
from tests.processes import start_redis_cluster
from tiers.base import HEADER_BYTES
from tiers.redis_cluster import RedisClusterTier


def redis_benchmark(port: int, value: int, n: int) -> dict[str, float]:
    """GiB/s of SET and GET with ``value``-byte values, one client, across the cluster."""
    out = subprocess.run(
        ["redis-benchmark", "--cluster", "-p", str(port), "-d", str(value), "-t", "set,get",
         "-n", str(n), "-c", "1", "--csv"],  # one key: every GET reads a value it SET
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rates = {}
    for row in csv.reader(out.splitlines()):
        if row and row[0] in ("SET", "GET"):
            rates[row[0]] = float(row[1]) * value / GIB
    return rates


class RedisPyPathTier(RedisClusterTier):
    """The tier forced onto redis-py's cluster pipeline, as for TLS or after a MOVED."""

    def _by_node(self, rkeys):
        return None


async def tier_rates(url: str, value: int, n: int, cls=RedisClusterTier, batch: int = 8):
    tier = cls(url, 1 << 40, prefix="bench:")
    await tier.start()
    src, items = make_items(n, value - HEADER_BYTES)  # src keeps the payloads alive
    start = time.perf_counter()
    for i in range(0, n, batch):
        assert all(await tier.put_many(items[i : i + batch]))
    put = n * value / GIB / (time.perf_counter() - start)
    keys = [m.key for m, _ in items]
    start = time.perf_counter()
    for i in range(0, n, batch):
        got = await tier.get_many(keys[i : i + batch])
        assert all(g is not None for g in got)
    get = n * value / GIB / (time.perf_counter() - start)
    for key in keys:
        await tier.delete(key)
    await tier.close()
    return {"SET": put, "GET": get}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gib", type=float, default=0.25, help="bytes moved per case and rep")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = start_redis_cluster(Path(tmp), masters=3, replicas=0)
        try:
            port = min(cluster.nodes)
            print(
                "Redis Cluster, 3 masters on loopback; GiB/s (ratio to redis-benchmark), "
                f"medians of {args.reps} reps"
            )
            for value in (2 << 20, 32 << 20):
                n = max(8, int(args.gib * GIB) // value)
                ours, slow, theirs = [], [], []
                for _ in range(args.reps):
                    ours.append(asyncio.run(tier_rates(cluster.url, value, n)))
                    slow.append(asyncio.run(tier_rates(cluster.url, value, n, RedisPyPathTier)))
                    theirs.append(redis_benchmark(port, value, n))
                for op, name in (("SET", "put_many"), ("GET", "get_many")):
                    a = statistics.median(r[op] for r in ours)
                    c = statistics.median(r[op] for r in slow)
                    b = statistics.median(r[op] for r in theirs)
                    print(f"  {value >> 20:>2} MiB {name:9s} {a:6.2f} ({a / b:4.2f}x)  "
                          f"redis-py path {c:6.2f} ({c / b:4.2f}x)  "
                          f"redis-benchmark {op} {b:6.2f}")  # fmt: skip
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
