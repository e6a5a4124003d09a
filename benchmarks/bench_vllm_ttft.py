"""TTFT of a long prompt in vLLM (CPU) with a full cacheservice hit vs recompute vs no connector.

    python benchmarks/bench_vllm_ttft.py [--tokens 3000] [--layers 8] [--hidden 1024]

Builds a random-weight Llama large enough that prefill dominates (no download), starts a
cacheservice subprocess, and times ``generate(max_tokens=1)`` (time to first token) for:
vLLM without the connector; with the connector, cold (recompute + store); with the connector,
a full hit in the same engine; and a full hit in a fresh engine process. vLLM's own prefix
cache is off throughout; every engine first runs another prompt of the same length so timings
are steady state, idles ``--pause`` seconds before each timed prompt, and each case is the
median of ``--reps`` distinct prompts. Prints the times and the speedup ratios (target: >= 5x).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BLOCK = 64


def engine(spec: dict) -> dict:
    """Runs inside a child process: one engine, timed prompts, JSON out."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kv = None
    if spec["url"]:
        kv = KVTransferConfig(
            kv_connector="CacheServiceConnector",
            kv_connector_module_path="connectors.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"url": spec["url"], "timeout_s": 30.0},
        )
    llm = LLM(
        spec["model"],
        dtype="float32",
        block_size=BLOCK,
        kv_cache_memory_bytes=spec["kv_bytes"],
        max_model_len=spec["tokens"] + 256,
        max_num_batched_tokens=spec["tokens"] + 256,
        enable_prefix_caching=False,
        enforce_eager=True,
        kv_transfer_config=kv,
    )
    one = SamplingParams(max_tokens=1, temperature=0)
    # Warm up at full length (oneDNN kernels for this shape, first touch of the KV cache) so
    # every timed prompt below runs in steady state.
    llm.generate({"prompt_token_ids": spec["warmup"]}, one, use_tqdm=False)
    times = []
    for prompt in spec["prompts"]:
        time.sleep(spec["pause_s"])  # let the service's write-down of earlier stores finish
        start = time.perf_counter()
        out = llm.generate({"prompt_token_ids": prompt}, one, use_tqdm=False)[0]
        times.append({"s": time.perf_counter() - start, "cached": out.num_cached_tokens or 0})
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    worker = get_kv_transfer_group()._worker if has_kv_transfer_group() else None
    return {"times": times, "worker": worker.stats if worker else {}}


def run_child(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--engine", json.dumps(spec)]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"engine failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return json.loads(lines[-1][7:])


def start_service(workdir: Path, arena_bytes: int, slot_bytes: int) -> tuple[subprocess.Popen, str]:
    from cacheservice.client import CacheClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--port", str(port), "--arena-path", str(workdir / "arena")]
    args += ["--arena-bytes", str(arena_bytes), "--slot-bytes", str(slot_bytes)]
    args += ["--disk-dir", str(workdir / "disk"), "--disk-bytes", str(4 * arena_bytes)]
    log = open(workdir / "service.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cacheservice", "serve", *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    with CacheClient(url, timeout=1.0) as probe:
        for _ in range(300):
            if probe.health():
                return proc, url
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError((workdir / "service.log").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--pause", type=float, default=3.0, help="seconds idle before each prompt")
    p.add_argument("--reps", type=int, default=3, help="distinct prompts per case (median)")
    p.add_argument("--engine", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:
        print("RESULT " + json.dumps(engine(json.loads(args.engine))), flush=True)
        return

    import numpy as np

    from tests.connectors.vllm.tiny_model import make_tiny_llama

    heads, kv_heads = args.hidden // 64, max(1, args.hidden // 256)
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as tmp:
        work = Path(tmp)
        model = make_tiny_llama(
            str(work / "model"),
            num_layers=args.layers,
            hidden=args.hidden,
            heads=heads,
            kv_heads=kv_heads,
            vocab=2048,
            max_positions=args.tokens + 512,
        )
        # Per token: layers x kv_heads x (k + v) x head_dim 64 x 4 bytes.
        token_bytes = args.layers * kv_heads * 2 * 64 * 4
        block_bytes = token_bytes * BLOCK
        slot = -(-(block_bytes + 64) // 4096) * 4096
        kv_bytes = token_bytes * (args.tokens + 1024)
        proc, url = start_service(
            work, (args.reps + 2) * block_bytes * (args.tokens // BLOCK), slot
        )
        try:
            rng = np.random.default_rng(0)
            longs = [rng.integers(3, 2000, args.tokens).tolist() for _ in range(args.reps)]
            warmup = rng.integers(3, 2000, args.tokens).tolist()
            base = {"model": model.path, "tokens": args.tokens, "kv_bytes": kv_bytes}
            base |= {"warmup": warmup, "pause_s": args.pause}
            plain = run_child(base | {"url": None, "prompts": longs})
            warm = run_child(base | {"url": url, "prompts": longs + longs})
            fresh = run_child(base | {"url": url, "prompts": longs})
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    def median(times: list[dict]) -> dict:
        mid = sorted(times, key=lambda t: t["s"])[len(times) // 2]
        return {"s": mid["s"], "cached": min(t["cached"] for t in times)}

    no_conn = median(plain["times"])["s"]
    cold, hit = median(warm["times"][: args.reps]), median(warm["times"][args.reps :])
    fresh_hit = median(fresh["times"])
    print(f"model: {args.layers} layers, hidden {args.hidden}; prompt {args.tokens} tokens, CPU")
    print(f"  medians of {args.reps} prompts; 'cached' = fewest tokens served by cacheservice")
    print(f"  vLLM, no connector         TTFT {no_conn * 1e3:8.1f} ms")
    print(f"  connector, cold (store)    TTFT {cold['s'] * 1e3:8.1f} ms")
    print(f"  connector, full hit        TTFT {hit['s'] * 1e3:8.1f} ms  ({hit['cached']} cached)")
    print(
        f"  fresh engine, full hit     TTFT {fresh_hit['s'] * 1e3:8.1f} ms  "
        f"({fresh_hit['cached']} cached)"
    )
    print(f"  speedup hit vs recompute (cold):      {cold['s'] / hit['s']:6.1f}x")
    print(f"  speedup hit vs vLLM without connector: {no_conn / hit['s']:6.1f}x")
    print(f"  speedup fresh-engine hit vs vLLM:      {no_conn / fresh_hit['s']:6.1f}x")
    print(f"  store overhead (cold vs vLLM):         {cold['s'] / no_conn:6.2f}x")
    print(f"  connector worker, store+hit engine: {warm['worker']}")
    print(f"  connector worker, fresh engine:     {fresh['worker']}")


if __name__ == "__main__":
    main()
