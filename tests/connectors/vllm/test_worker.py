"""The worker side against a real service, outside vLLM, called as vLLM's model runner calls
it (start_load_kv before the forward, wait_for_save after it): a step's reserves go out before
its forward and a step that never saves gives its slots back; before vLLM registered any KV
cache, every call is answered, nothing crashes, and a load it cannot do is reported once as
failed blocks (vLLM recomputes them)."""

from __future__ import annotations

import time

import torch

from connectors.vllm import saves
from connectors.vllm.scheduler import CacheLayout, CacheServiceMeta, LoadSpec, SaveSpec, Settings
from connectors.vllm.worker import WorkerSide
from index.hashing import ROOT_KEY
from tests.factories import make_namespace, make_prefix_keys
from tests.processes import free_port, wait_until

LAYERS = ("layers.0.attn", "layers.1.attn")
LAYER_BYTES = 2 * 32 * 8 * 4  # K and V of 32 tokens, one head of 8 floats


def make_worker(url: str, num_blocks: int = 16) -> tuple[WorkerSide, dict[str, torch.Tensor]]:
    ns = make_namespace(block_tokens=32)
    layout = CacheLayout((ns,), 2 * LAYER_BYTES, LAYERS, LAYER_BYTES, 32)
    worker = WorkerSide(Settings(url=url), layout, 0, num_blocks)
    caches = {name: torch.randn(num_blocks, 2, 32, 1, 8) for name in LAYERS}
    worker.register_kv_caches(caches)
    return worker, caches


def step(worker: WorkerSide, meta: CacheServiceMeta) -> None:
    """One engine step as vLLM's model runner drives the connector."""
    worker.start_load_kv(meta)
    for name in LAYERS:  # the forward
        worker.wait_for_layer_load(name)
    worker.wait_for_save(meta)


def test_reserves_go_out_before_the_forward_and_unused_ones_are_given_back(make_service):
    svc = make_service("worker", extra=["--slot-bytes", "8192"])
    worker, caches = make_worker(svc.url)
    ns = worker.ns
    keys = make_prefix_keys(ns, 4)
    saves = [
        SaveSpec("a", (tuple(keys[:2]),), (ROOT_KEY,), (0, 1)),
        SaveSpec("b", (tuple(keys[2:]),), (keys[1],), (2, 3)),
    ]
    meta = CacheServiceMeta(saves=saves)
    try:
        with svc.client() as c:
            worker.start_load_kv(meta)
            # before the forward has run, the service already holds the step's slots
            wait_until(lambda: c.stats()["reserved_slots"] == 4, 5, "no reserve before save")
            for name in LAYERS:
                worker.wait_for_layer_load(name)
            worker.wait_for_save(meta)
            worker.flush()
            assert worker.stats["saved_blocks"] == 4 and c.lookup(ns.id, keys).hits == 4
            step(worker, CacheServiceMeta(loads=[LoadSpec("l", (tuple(keys),), (8, 9, 10, 11))]))
            assert worker.take_load_errors() == set()
            for cache in caches.values():
                assert torch.equal(cache[0:4], cache[8:12]), "loaded KV differs from saved"
            # a step whose wait_for_save never comes: the next step aborts its reserve
            other = make_prefix_keys(ns, 6, seed=1)
            lost = [SaveSpec("c", (tuple(other),), (ROOT_KEY,), (4, 5, 6, 7, 12, 13))]
            worker.start_load_kv(CacheServiceMeta(saves=lost))
            wait_until(lambda: c.stats()["reserved_slots"] == 6, 5, "no reserve before save")
            step(worker, CacheServiceMeta())
            wait_until(lambda: c.stats()["leases"] == 0, 5, "reserve never aborted")
            assert c.stats()["reserved_slots"] == 0 and c.lookup(ns.id, other).hits == 0
            # saved without a prepare (a caller that skips start_load_kv): still stored
            worker.wait_for_save(CacheServiceMeta(saves=lost))
            worker.flush()
            assert c.lookup(ns.id, other).hits == 6
    finally:
        worker.close()


def test_a_reserve_older_than_a_long_forward_is_asked_again(make_service, monkeypatch):
    """A prefill that outlasts AHEAD_S (a lease may expire under it) gives the early reserve
    back and reserves after the forward: the blocks are stored, no lease is left over."""
    monkeypatch.setattr(saves, "AHEAD_S", 0.05)
    svc = make_service("worker", extra=["--slot-bytes", "8192"])
    worker, _ = make_worker(svc.url)
    keys = make_prefix_keys(worker.ns, 3, seed=2)
    meta = CacheServiceMeta(saves=[SaveSpec("a", (tuple(keys),), (ROOT_KEY,), (0, 1, 2))])
    try:
        with svc.client() as c:
            worker.start_load_kv(meta)
            wait_until(lambda: c.stats()["reserved_slots"] == 3, 5, "no reserve before save")
            time.sleep(0.1)  # the forward of a long prompt
            worker.wait_for_save(meta)
            worker.flush()
            assert c.lookup(worker.ns.id, keys).hits == 3
            wait_until(lambda: c.stats()["leases"] == 0, 5, "the early reserve was not released")
            assert c.stats()["reserved_slots"] == 0
    finally:
        worker.close()


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
