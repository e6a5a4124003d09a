"""Tier throughput against the raw mechanism each tier is built on, measured in the same run.

    python -m benchmarks.bench_tiers [--block-mib 2] [--host-blocks 512] [--disk-blocks 256]
                                     [--redis-blocks 256] [--batch 8] [--reps 3]

- host:  HostTier.put / raw slot load / checksum-verified get vs np.copyto of the same bytes.
- disk:  DiskTier.put_many / get_many vs open-write-close / open-read-close of the same sizes in
         the same directory (page cache warm for both; neither fsyncs).
- redis: RedisTier.put_many / get_many (pipelined, ``--batch`` per round trip) vs
         ``redis-benchmark -d <value> -c 1 -P <batch>`` against the same redis-server.
Each number is the best of ``--reps`` repetitions. Prints a table and PASS/FAIL per target.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from tiers.base import HEADER_BYTES, BlockMeta
from tiers.disk import DiskTier
from tiers.host import HostTier
from tiers.redis import RedisTier

GIB = 1 << 30


@dataclass(frozen=True)
class Row:
    tier: str
    op: str
    gibps: float
    baseline: str
    base_gibps: float
    target: float | None  # minimum ratio, None = informational

    @property
    def ratio(self) -> float:
        return self.gibps / self.base_gibps


async def duel(
    reps: int, ours: Callable[[], Awaitable[float]], base: Callable[[], float], nbytes: int
) -> tuple[float, float]:
    """GiB/s of the fastest of ``reps`` runs of each, alternating them so that load from other
    processes hits both alike. Each function times itself and returns seconds."""
    t_ours, t_base = [], []
    for _ in range(reps):
        t_base.append(base())
        t_ours.append(await ours())
    return nbytes / min(t_ours) / GIB, nbytes / min(t_base) / GIB


def make_items(n: int, size: int) -> tuple[np.ndarray, list[tuple[BlockMeta, memoryview]]]:
    src = np.random.default_rng(0).integers(0, 256, n * size, dtype=np.uint8)
    view = memoryview(src)
    items = []
    for i in range(n):
        payload = view[i * size : (i + 1) * size]
        items.append(
            (BlockMeta.for_payload(1, i.to_bytes(16, "little"), bytes(16), payload), payload)
        )
    return src, items


async def bench_host(n: int, size: int, reps: int) -> list[Row]:
    src, items = make_items(n, size)
    dst = np.empty_like(src)
    slot = -(-(size + HEADER_BYTES) // 4096) * 4096
    path = os.path.join(
        "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
        f"bench-arena-{os.getpid()}",
    )
    host = HostTier(path, n * slot, slot)
    blocks = [(dst[i * size : (i + 1) * size], src[i * size : (i + 1) * size]) for i in range(n)]
    keys = [meta.key for meta, _ in items]

    def memcpy() -> float:
        t = time.perf_counter()
        for out, inp in blocks:
            np.copyto(out, inp)
        return time.perf_counter() - t

    async def store() -> float:
        for key in keys:
            await host.delete(key)
        t = time.perf_counter()
        for meta, payload in items:
            await host.put(meta, payload)
        return time.perf_counter() - t

    async def load_raw() -> float:
        t = time.perf_counter()
        for key, (out, _) in zip(keys, blocks, strict=True):
            np.copyto(out, np.frombuffer(host.payload_view(host.slot_of(key), size), np.uint8))
        return time.perf_counter() - t

    async def load_verified() -> float:
        t = time.perf_counter()
        for key, (out, _) in zip(keys, blocks, strict=True):
            block = await host.get(key)
            np.copyto(out, np.frombuffer(block.payload, np.uint8))
        return time.perf_counter() - t

    try:
        memcpy()  # fault the destination in
        put, base_put = await duel(reps + 1, store, memcpy, n * size)  # first put faults arena in
        raw, base_raw = await duel(reps, load_raw, memcpy, n * size)
        assert np.array_equal(dst, src), "host load returned different bytes"
        verified, base_ver = await duel(reps, load_verified, memcpy, n * size)
        host.check_integrity()
    finally:
        await host.close()
    return [
        Row("host", "store (put)", put, "np.copyto", base_put, 0.9),
        Row("host", "load (slot copy)", raw, "np.copyto", base_raw, 0.9),
        Row("host", "load (get+verify+copy)", verified, "np.copyto", base_ver, None),
    ]


async def bench_disk(n: int, size: int, reps: int, batch: int, root: str) -> list[Row]:
    _, items = make_items(n, size)
    nbytes = n * (size + HEADER_BYTES)
    raw_dir = os.path.join(root, "raw")
    os.makedirs(raw_dir)
    raw_paths = [os.path.join(raw_dir, f"{i}.blk") for i in range(n)]
    datas = [meta.encode() + bytes(payload) for meta, payload in items]
    disk = DiskTier(os.path.join(root, "tier"), 2 * nbytes)
    keys = [meta.key for meta, _ in items]
    batches = [items[i : i + batch] for i in range(0, n, batch)]

    def raw_write() -> float:
        for p in raw_paths:
            if os.path.exists(p):
                os.unlink(p)
        t = time.perf_counter()
        for p, data in zip(raw_paths, datas, strict=True):
            with open(p, "wb") as f:
                f.write(data)
        return time.perf_counter() - t

    def raw_read(hold: int) -> float:
        # like the tier, keep ``hold`` freshly read buffers alive at once (a get_many batch)
        t = time.perf_counter()
        for i in range(0, n, hold):
            held = []
            for p in raw_paths[i : i + hold]:
                with open(p, "rb") as f:
                    held.append(f.read())
            del held
        return time.perf_counter() - t

    async def tier_write() -> float:
        for key in keys:
            await disk.delete(key)
        t = time.perf_counter()
        for b in batches:
            await disk.put_many(b)
        return time.perf_counter() - t

    async def tier_read(hold: int) -> float:
        t = time.perf_counter()
        for i in range(0, n, hold):
            got = await disk.get_many(keys[i : i + hold])
            assert all(g is not None for g in got), "disk tier lost a block"
        return time.perf_counter() - t

    w, wb = await duel(reps, tier_write, raw_write, nbytes)
    r1, rb1 = await duel(reps, lambda: tier_read(1), lambda: raw_read(1), nbytes)
    r, rb = await duel(reps, lambda: tier_read(batch), lambda: raw_read(batch), nbytes)
    disk.check_integrity()
    return [
        Row("disk", f"write (put_many x{batch})", w, "open/write/close", wb, 0.8),
        Row("disk", "read (get, verified)", r1, "open/read/close", rb1, 0.8),
        Row(
            "disk",
            f"read (get_many x{batch}, verified)",
            r,
            f"open/read/close, hold {batch}",
            rb,
            0.8,
        ),
    ]


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


def report(rows: list[Row], size: int) -> bool:
    print(f"\nblock payload {size / (1 << 20):g} MiB")
    print(
        f"{'tier':6} {'operation':34} {'GiB/s':>7}  {'baseline':36} {'GiB/s':>7} {'ratio':>6}  "
        "target"
    )
    ok = True
    for row in rows:
        verdict = (
            "info"
            if row.target is None
            else (f"{'PASS' if row.ratio >= row.target else 'FAIL'} >= {row.target}x")
        )
        ok &= row.target is None or row.ratio >= row.target
        print(
            f"{row.tier:6} {row.op:34} {row.gibps:7.2f}  {row.baseline:36} {row.base_gibps:7.2f} "
            f"{row.ratio:5.2f}x  {verdict}"
        )
    return ok


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--block-mib", type=float, default=2.0, help="payload size per block")
    ap.add_argument("--host-blocks", type=int, default=512)
    ap.add_argument("--disk-blocks", type=int, default=256)
    ap.add_argument("--redis-blocks", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="blocks per put_many/get_many call")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="directory for disk/redis files (default: tmp)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["host", "disk", "redis"])
    args = ap.parse_args()
    size = int(args.block_mib * (1 << 20))
    root = tempfile.mkdtemp(prefix="bench-tiers-", dir=args.dir)
    rows: list[Row] = []
    try:
        if "host" not in args.skip:
            rows += await bench_host(args.host_blocks, size, args.reps)
        if "disk" not in args.skip:
            rows += await bench_disk(args.disk_blocks, size, args.reps, args.batch, root)
        if "redis" not in args.skip:
            if shutil.which("redis-server") and shutil.which("redis-benchmark"):
                rows += await bench_redis(args.redis_blocks, size, args.reps, args.batch, root)
            else:
                print("redis-server/redis-benchmark not installed: redis tier skipped")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if report(rows, size) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
