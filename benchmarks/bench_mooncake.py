"""Replay the public Mooncake traces through the prefix tree's LRU and report block hit rates.

Each trace request lists ``hash_ids``, one per 512-token block, already chained to the prefix.
The replay stores every block a request brings, evicts with ``PrefixTree.evict_candidates``
down to a capacity given as a fraction of the trace's unique blocks, and counts hits as the
longest stored prefix at arrival. The unlimited-capacity hit rate is the physical limit of
prefix reuse on that trace (36.6% conversation, 64.0% synthetic per the data README).

    python -m benchmarks.bench_mooncake [--trace PATH] [--fractions 0.05,0.1,0.25,0.5,1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import xxhash

from index.hashing import ROOT_KEY
from index.radix import PrefixTree

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRACES = ("mooncake_conversation_trace.jsonl", "mooncake_synthetic_trace.jsonl")


def load_trace(path: Path) -> list[list[bytes]]:
    with path.open() as f:
        return [
            [xxhash.xxh3_128_digest(str(h).encode()) for h in json.loads(line)["hash_ids"]]
            for line in f
        ]


def replay(requests: list[list[bytes]], capacity: int | None) -> float:
    tree = PrefixTree()
    hits = total = 0
    for keys in requests:
        matched = tree.match(keys).length
        hits += matched
        total += len(keys)
        tree.touch(keys[:matched])
        parent = keys[matched - 1] if matched else ROOT_KEY
        for key in keys[matched:]:
            tree.insert(parent, key, "host", 1)
            parent = key
        if capacity is not None:
            excess = tree.blocks_in("host") - capacity
            while excess > 0:
                victims = tree.evict_candidates("host", excess)
                assert victims, "an unpinned tree always has a leaf to evict"
                for key in victims:
                    tree.remove_tier(key, "host")
                excess = tree.blocks_in("host") - capacity
    tree.check_integrity()
    return hits / total if total else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, action="append", help="trace file(s); default: both")
    ap.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1.0")
    args = ap.parse_args()
    fractions = [float(x) for x in args.fractions.split(",")]
    for path in args.trace or [DATA / name for name in TRACES]:
        requests = load_trace(path)
        unique = len({k for keys in requests for k in keys})
        limit = replay(requests, None)
        print(f"\n{path.name}: {len(requests)} requests, {unique} unique 512-token blocks")
        print(f"  unlimited capacity: block hit rate {limit:.1%} (the trace's reuse limit)")
        print(f"  {'capacity':>18} {'hit rate':>9} {'vs limit':>9} {'replay s':>9}")
        for frac in fractions:
            cap = max(1, int(unique * frac))
            t0 = time.perf_counter()
            rate = replay(requests, cap)
            dt = time.perf_counter() - t0
            print(f"  {cap:>8} ({frac:>5.0%}) {rate:>9.1%} {rate / limit:>8.2f}x {dt:>9.2f}")


if __name__ == "__main__":
    main()
