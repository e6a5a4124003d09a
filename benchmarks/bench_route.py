"""Latency of the routing call on a router's hot path: an 8K-token prompt, four engines.

A real ``cacheservice serve`` process follows four engines' KV-event streams (PUB sockets in
this process sending vLLM's wire format; each engine holds a different share of the prompt)
and holds the prompt's blocks in its host tier. Timed per call, over TCP and the unix socket:
hashing the prompt into keys in the client, ``/v1/route`` alone, and both; p50 and p99 of
``--calls`` calls, beside the transport's floor (``GET /health``, no work). The goal is
< 1 ms for 8K tokens, hashing included.

    python -m benchmarks.bench_route [--tokens 8192] [--block-tokens 16] [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from cacheservice.client import CacheClient
from cacheservice.kv_events import Stored, encode_batch, seq_bytes
from cacheservice.results import EngineSpec
from index.hashing import ROOT_KEY, Namespace, prefix_keys
from tests.processes import free_port, start_service


def quantiles(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=100)
    return f"p50 {q[49] * 1e3:.3f} ms, p99 {q[98] * 1e3:.3f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    bt, n = args.block_tokens, args.tokens
    tokens = np.random.default_rng(0).integers(0, 50_000, n).astype(np.uint32)
    work = Path(tempfile.mkdtemp(prefix="bench-route-"))
    svc = start_service(work, unix_socket=True, extra=["--arena-bytes", "64MiB"])
    ctx = zmq.Context.instance()
    pubs = []
    try:
        ns = Namespace("bench-route", "bfloat16", "NHD", bt)
        tcp = CacheClient(svc.http_url)
        tcp.register(ns, 1024)
        keys = prefix_keys(tokens, ns.seed, bt)
        for i in range(0, len(keys), 256):  # the prompt is in the host tier too
            part = keys[i : i + 256]
            tcp.put_blocks(ns.id, part, b"\0" * (1024 * len(part)), keys[i - 1] if i else ROOT_KEY)
        for e in range(args.engines):
            port = free_port()
            pub = ctx.socket(zmq.PUB)
            pub.bind(f"tcp://127.0.0.1:{port}")
            pubs.append(pub)
            tcp.register_engine(EngineSpec(f"e{e}", ns.id, f"tcp://127.0.0.1:{port}"))
        time.sleep(0.5)  # connected and subscribed
        for e, pub in enumerate(pubs):  # engine e holds the first (e+1)/engines of the prompt
            held = len(keys) * (e + 1) // args.engines
            hashes = [f"e{e}:{i}".encode() for i in range(held)]
            event = Stored(hashes, None, tokens[: held * bt].tolist(), bt, "GPU")
            pub.send_multipart((b"", seq_bytes(0), encode_batch(time.time(), [event])))
        deadline = time.monotonic() + 10
        while min(e["blocks"] for e in tcp.engines()) == 0:
            assert time.monotonic() < deadline, "engines' events never arrived"
            time.sleep(0.05)
        route = tcp.route(ns.id, keys, n)
        gpu = sorted(e.gpu_tokens for e in route.engines)
        print(f"# {n}-token prompt, {len(keys)} keys of {bt} tokens, {args.engines} engines "
              f"holding {gpu} tokens on GPU; best {route.best}")  # fmt: skip
        for name, client in (("tcp", tcp), ("unix", CacheClient(svc.url))):
            hash_s, route_s, total_s = [], [], []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                k = prefix_keys(tokens, ns.seed, bt)
                t1 = time.perf_counter()
                client.route(ns.id, k, n)
                t2 = time.perf_counter()
                hash_s.append(t1 - t0)
                route_s.append(t2 - t1)
                total_s.append(t2 - t0)
            floor = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                client.health()
                floor.append(time.perf_counter() - t0)
            print(f"{name}: hashing {quantiles(hash_s)} | route call {quantiles(route_s)} | "
                  f"both {quantiles(total_s)} | transport floor (GET /health) "
                  f"{quantiles(floor)}")  # fmt: skip
    finally:
        for pub in pubs:
            pub.close(linger=0)
        svc.stop()


if __name__ == "__main__":
    main()
