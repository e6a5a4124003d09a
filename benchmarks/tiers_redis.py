"""RedisTier against ``redis-benchmark`` on the same throwaway redis-server."""

from __future__ import annotations

import csv
import socket
import subprocess
import time

from benchmarks.tier_duel import GIB, Row, make_items
from tiers.base import HEADER_BYTES
from tiers.redis import RedisTier


def start_redis(workdir: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.01)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def redis_benchmark(port: int, value: int, n: int, pipeline: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-d",
            str(value),
            "-t",
            "set,get",
            "-n",
            str(n),
            "-c",
            "1",
            "-P",
            str(pipeline),
            "--csv",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    rows = list(csv.DictReader(out.splitlines()))
    return {row["test"]: float(row["rps"]) * value / GIB for row in rows}


async def bench_redis(n: int, size: int, reps: int, batch: int, root: str) -> list[Row]:
    proc, port = start_redis(root)
    try:
        _, items = make_items(n, size)
        value = size + HEADER_BYTES
        tier = RedisTier(f"redis://127.0.0.1:{port}/0", 4 * n * value)
        keys = [meta.key for meta, _ in items]
        batches = [items[i : i + batch] for i in range(0, n, batch)]

        async def put() -> float:
            t = time.perf_counter()
            for b in batches:
                assert all(await tier.put_many(b)), "redis put failed"
            return time.perf_counter() - t

        async def get() -> float:
            t = time.perf_counter()
            for i in range(0, n, batch):
                got = await tier.get_many(keys[i : i + batch])
                assert all(g is not None for g in got), "redis get missed"
            return time.perf_counter() - t

        async def put_one() -> float:
            t = time.perf_counter()
            for item in items:
                assert await tier.put(*item), "redis put failed"
            return time.perf_counter() - t

        async def get_one() -> float:
            t = time.perf_counter()
            for key in keys:
                assert await tier.get(key) is not None, "redis get missed"
            return time.perf_counter() - t

        # redis-benchmark's best of no pipelining and -P batch: the stronger baseline
        bench: list[dict[str, float]] = []

        def baseline() -> float:
            bench.append(redis_benchmark(port, value, n, 1))
            bench.append(redis_benchmark(port, value, n, batch))
            return 1.0

        ours = {"put": [], "get": [], "put1": [], "get1": []}
        for _ in range(reps):
            baseline()
            ours["put"].append(n * value / await put() / GIB)
            ours["get"].append(n * value / await get() / GIB)
            ours["put1"].append(n * value / await put_one() / GIB)
            ours["get1"].append(n * value / await get_one() / GIB)
        tier.check_integrity()
        await tier.close()
    finally:
        proc.kill()
        proc.wait()
    base_set = max(b["SET"] for b in bench)
    base_get = max(b["GET"] for b in bench)
    name = f"redis-benchmark best(-P1,-P{batch})"
    return [
        Row("redis", "put", max(ours["put1"]), name + " SET", base_set, 0.7),
        Row("redis", "get (verified)", max(ours["get1"]), name + " GET", base_get, 0.7),
        Row("redis", f"put_many x{batch}", max(ours["put"]), name + " SET", base_set, 0.7),
        Row(
            "redis", f"get_many x{batch} (verified)", max(ours["get"]), name + " GET", base_get, 0.7
        ),
    ]
