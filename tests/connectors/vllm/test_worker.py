"""The worker side before vLLM registered any KV cache: every call is answered, nothing
crashes, and a load it cannot do is reported once as failed blocks (vLLM recomputes them)."""

from __future__ import annotations

from connectors.vllm.scheduler import CacheLayout, CacheServiceMeta, LoadSpec, SaveSpec, Settings
from connectors.vllm.worker import WorkerSide
from index.hashing import ROOT_KEY
from tests.factories import make_namespace, make_prefix_keys
from tests.processes import free_port


def test_an_unregistered_worker_fails_loads_and_skips_saves():
    ns = make_namespace(block_tokens=32)
    keys = tuple(make_prefix_keys(ns, 2))
    layout = CacheLayout((ns,), 1024, ("layers.0.attn",), 1024, 32)
    # A port nobody listens on: any call to the service would fail, none is made.
    worker = WorkerSide(Settings(url=f"http://127.0.0.1:{free_port()}"), layout, 0, 8)
    try:
        worker.start_load_kv(CacheServiceMeta(loads=[LoadSpec("r", (keys,), (3, 5))]))
        worker.wait_for_layer_load("layers.0.attn")
        worker.wait_for_save(CacheServiceMeta(saves=[SaveSpec("s", (keys,), (ROOT_KEY,), (1, 2))]))
        assert worker.take_load_errors() == {3, 5}
        assert worker.take_load_errors() == set(), "each failed block is reported once"
        assert worker.stats["saved_blocks"] == 0 and worker.get_finished() is None
    finally:
        worker.close()
