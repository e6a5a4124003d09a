"""Tier throughput against the raw mechanism each tier is built on, measured in the same run.

    python -m benchmarks.bench_tiers [--block-mib 2] [--host-blocks 512] [--disk-blocks 256]
                                     [--redis-blocks 256] [--batch 8] [--reps 3]

- host:  HostTier.put / raw slot load / checksum-verified get vs np.copyto of the same bytes.
- disk:  DiskTier.put_many / get_many vs open-write-close / open-read-close of the same sizes in
         the same directory (page cache warm for both; neither fsyncs).
- redis: RedisTier.put_many / get_many (pipelined, ``--batch`` per round trip) vs
         ``redis-benchmark -d <value> -c 1 -P <batch>`` against the same redis-server.
Host and disk numbers are the best of ``--reps`` repetitions; redis numbers are medians of
``--reps`` interleaved repetitions (use 5 or more). Prints a table and PASS/FAIL per target.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile

from benchmarks.tier_duel import Row, report
from benchmarks.tiers_local import bench_disk, bench_host
from benchmarks.tiers_redis import bench_redis
from cacheservice.memory import tune_allocator


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
    tune_allocator()  # as the service does; raw baselines allocate through the same malloc
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
