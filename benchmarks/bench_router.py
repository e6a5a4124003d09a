"""Cache-aware routing over the Mooncake conversation trace: N engines with bounded GPU caches.

Each simulated engine keeps an LRU of 512-token blocks (its GPU KV cache) and reports every
change as a vLLM KV-event batch, encoded and decoded in vLLM's wire format and applied by the
service's own code (engine_feed.apply_batch into index.engines.EngineBlocks). The service's
tiers are a real PrefixTree (a bounded host arena over a bounded disk) holding every block any
engine computed, as the connector stores them. Policies, same requests, same run:

- round-robin;
- prefix affinity from engine events only (what llm-d's KV-cache scorer does): the engine
  with the most prompt blocks on its GPU;
- ours: ``Fleet.route`` (events + tiers): the engine where GPU hits, tier loads and
  computed tokens cost least.

Both affinity policies choose among engines whose recent load is at most ``--load-cap``
times the mean (the rest are busy), so neither may pile every request onto one engine.
Printed per policy: tokens served from GPU, from the tiers, computed; the estimated prefill
seconds (computed tokens over ``--prefill-tps``, loaded bytes over each tier's bandwidth);
the ratio to round-robin; the load imbalance (max/mean requests). Round-robin and events-only
are printed twice: on engines alone, and beside the service's tiers (any router gains those
once the connector is installed), so the routing gain is told apart from the tier gain.

    python -m benchmarks.bench_router [--engines 4] [--gpu-blocks 600] [--requests 12031]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cacheservice.engine_feed import FeedStats, apply_batch
from cacheservice.fleet import Fleet
from cacheservice.kv_events import Removed, Stored, decode_batch, encode_batch
from cacheservice.results import EngineSpec
from index.engines import EngineBlocks
from index.hashing import ROOT_KEY, Namespace, prefix_keys
from index.radix import PrefixTree
from tiers.rates import ReadRates

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BLOCK = 512  # tokens per Mooncake hash id
NS = Namespace("llama-3.1-8b", "bfloat16", "sim", BLOCK)
BLOCK_BYTES = BLOCK * 128 * 1024  # Llama-3.1-8B bf16: 128 KiB of KV per token


def block_tokens(h: int) -> np.ndarray:
    return (np.arange(BLOCK, dtype=np.uint32) + np.uint32(h * BLOCK)).astype(np.uint32)


@dataclass
class SimEngine:
    """An engine's GPU prefix cache: LRU blocks by trace hash id, events out."""

    name: str
    capacity: int
    lru: OrderedDict = field(default_factory=OrderedDict)

    def hits(self, ids: list[int]) -> int:
        return next((i for i, h in enumerate(ids) if h not in self.lru), len(ids))

    def serve(self, ids: list[int]) -> bytes:
        """Cache the prompt's blocks; returns the KV-event batch this step publishes."""
        events = []
        for i, h in enumerate(ids):
            if h in self.lru:
                self.lru.move_to_end(h)
                continue
            parent = ids[i - 1] if i else None
            events.append(Stored([h], parent, block_tokens(h).tolist(), BLOCK, "GPU"))
            self.lru[h] = True
        gone = []
        while len(self.lru) > self.capacity:
            gone.append(self.lru.popitem(last=False)[0])
        if gone:
            events.append(Removed(gone, "GPU"))
        return encode_batch(time.time(), events)


class _Feed:
    """What Fleet reads of a feed: the spec, the connection, the blocks."""

    def __init__(self, name: str, ns: str, blocks: EngineBlocks) -> None:
        self.spec = EngineSpec(name, ns, "tcp://sim:1", url=name)
        self.connected = True
        self.blocks = blocks
        self.stats = FeedStats()


class _Namespaces:
    def get(self, ns: str) -> tuple[Namespace, int]:
        return NS, BLOCK_BYTES


class Tiers:
    """The service's tiers: host over disk, every computed block stored, LRU both."""

    def __init__(self, host_blocks: int, disk_blocks: int) -> None:
        self.tree = PrefixTree()
        self.caps = {"host": host_blocks, "disk": disk_blocks}

    def store(self, keys: list[bytes]) -> None:
        parent = ROOT_KEY
        for key in keys:
            if key in self.tree:
                self.tree.add_tier(key, "host")
            else:
                self.tree.insert(parent, key, "host", BLOCK_BYTES)
            self.tree.add_tier(key, "disk")  # written down
            parent = key
        self.tree.touch(keys)
        for tier, cap in self.caps.items():
            while (excess := self.tree.blocks_in(tier) - cap) > 0:
                for key in self.tree.evict_candidates(tier, excess):
                    self.tree.remove_tier(key, tier)


@dataclass
class Totals:
    gpu: int = 0
    tier: int = 0
    computed: int = 0
    prefill_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    per_engine: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Request:
    arrival: float  # seconds
    num_tokens: int
    ids: list[int]  # the trace's hash ids of its full blocks
    keys: list[bytes]  # our keys of the same blocks


def load_trace(limit: int) -> list[Request]:
    out = []
    with (DATA / "mooncake_conversation_trace.jsonl").open() as f:
        for _, line in zip(range(limit), f, strict=False):
            req = json.loads(line)
            full = min(req["input_length"] // BLOCK, len(req["hash_ids"]))
            ids = req["hash_ids"][:full]
            tokens = np.concatenate([block_tokens(h) for h in ids]) if ids else np.zeros(0)
            keys = prefix_keys(tokens.astype(np.uint32), NS.seed, BLOCK)
            out.append(Request(req["timestamp"] / 1000, req["input_length"], ids, keys))
    return out


def run(policy: str, trace: list[Request], args, with_tiers: bool) -> tuple[Totals, list[float]]:
    """Replay ``trace``: each engine prefills one request at a time (busy_until); a router
    sees each engine's queue (its wait) and estimates the prefill it would cost there."""
    engines = [SimEngine(f"e{i}", args.gpu_blocks) for i in range(args.engines)]
    rates = ReadRates({"host": args.host_gbps * 1e9, "disk": args.disk_gbps * 1e9})
    tiers = Tiers(args.host_blocks, args.disk_blocks)
    fleet = Fleet(tiers.tree if with_tiers else PrefixTree(), _Namespaces(), rates,
                  prefill_tokens_per_s=args.prefill_tps)  # fmt: skip
    for e in engines:
        fleet.feeds[e.name] = _Feed(e.name, NS.id, EngineBlocks(NS.seed, BLOCK))
    busy = [0.0] * len(engines)
    totals, route_s = Totals(per_engine=[0] * len(engines)), []
    for n, req in enumerate(trace):
        now = req.arrival / args.time_scale
        wait = [max(0.0, b - now) for b in busy]
        if policy == "round-robin":
            pick = n % len(engines)
        elif policy == "events-only":  # knows each GPU's blocks (events), nothing of tiers
            left = [req.num_tokens - fleet.feeds[e.name].blocks.run(req.keys) * BLOCK
                    for e in engines]  # fmt: skip
            pick = min(range(len(engines)), key=lambda i: wait[i] + left[i] / args.prefill_tps)
        else:
            start = time.perf_counter()
            route = fleet.route(NS.id, req.keys, req.num_tokens)
            route_s.append(time.perf_counter() - start)
            cost = {r.engine: r.cost_s for r in route.engines}
            pick = min(range(len(engines)), key=lambda i: wait[i] + cost[engines[i].name])
        e = engines[pick]
        gpu = e.hits(req.ids)
        from_tiers = fleet.tree.match(req.keys).tiers[gpu:] if with_tiers else []
        computed = req.num_tokens - (gpu + len(from_tiers)) * BLOCK
        prefill = computed / args.prefill_tps
        prefill += sum(rates.seconds(t, BLOCK_BYTES) for t in from_tiers)
        busy[pick] = max(busy[pick], now) + prefill
        totals.ttft.append(busy[pick] - now)
        totals.gpu += gpu * BLOCK
        totals.tier += len(from_tiers) * BLOCK
        totals.computed += computed
        totals.prefill_s += prefill
        totals.per_engine[pick] += 1
        apply_batch(fleet.feeds[e.name].blocks, decode_batch(e.serve(req.ids)), FeedStats())
        if with_tiers:
            tiers.store(req.keys)
    for feed in fleet.feeds.values():
        feed.blocks.check_integrity()
    return totals, route_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=12031)
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--gpu-blocks", type=int, default=600, help="per engine (~300K tokens)")
    p.add_argument("--host-blocks", type=int, default=16000, help="service host arena")
    p.add_argument("--disk-blocks", type=int, default=64000)
    p.add_argument("--prefill-tps", type=float, default=10000.0, help="tokens/s per engine")
    p.add_argument("--host-gbps", type=float, default=25.0, help="host -> GPU (PCIe)")
    p.add_argument("--disk-gbps", type=float, default=5.0)
    p.add_argument("--time-scale", type=float, default=1.0, help=">1 replays the trace faster")
    args = p.parse_args()
    trace = load_trace(args.requests)
    total = sum(r.num_tokens for r in trace)
    print(f"# Mooncake conversation trace: {len(trace)} requests, {total} prompt tokens; "
          f"{args.engines} engines x {args.gpu_blocks} GPU blocks of {BLOCK} tokens; tiers "
          f"host {args.host_blocks} / disk {args.disk_blocks} blocks; prefill "
          f"{args.prefill_tps:.0f} tok/s, host {args.host_gbps} GB/s, "
          f"disk {args.disk_gbps} GB/s")  # fmt: skip
    rows = [("round-robin", False), ("events-only", False), ("round-robin", True),
            ("events-only", True), ("ours", True)]  # fmt: skip
    base = None
    print(
        "| policy | tiers | GPU hit tokens | tier hit tokens | computed | prefill s "
        "| prefill vs RR | mean TTFT s | p90 TTFT s | imbalance |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for policy, with_tiers in rows:
        t, route_s = run(policy, trace, args, with_tiers)
        base = base or t.prefill_s
        imbalance = max(t.per_engine) / statistics.mean(t.per_engine)
        p90 = statistics.quantiles(t.ttft, n=10)[8]
        print(f"| {policy} | {'yes' if with_tiers else 'no'} | {t.gpu / total:.1%} | "
              f"{t.tier / total:.1%} | {t.computed / total:.1%} | {t.prefill_s:.0f} | "
              f"{base / t.prefill_s:.2f}x | {statistics.mean(t.ttft):.2f} | {p90:.2f} | "
              f"{imbalance:.2f} |")  # fmt: skip
        if route_s:
            q = statistics.quantiles(route_s, n=100)
            print(f"#   Fleet.route in process: p50 {q[49] * 1e6:.0f} us, "
                  f"p99 {q[98] * 1e6:.0f} us ({args.engines} engines, "
                  f"mean {total / len(trace):.0f}-token prompts)")  # fmt: skip


if __name__ == "__main__":
    main()
