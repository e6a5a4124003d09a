"""Pages go through a real cacheservice and come back bit for bit, in both host layouts,
through SGLang's zero-copy v1 path (arena or HTTP) and its flat-tensor path."""

from __future__ import annotations

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageExtraInfo

from cacheservice.arena import ArenaView
from cacheservice.errors import BadRequest
from connectors.sglang import CacheServiceHiCacheStorage
from connectors.sglang.transport import ArenaTransport, HttpTransport
from tests.connectors.sglang.pools import HostPool, make_config, page_indices

LAYOUTS = ["page_first", "layer_first"]


def keys_for(name: str, n: int) -> list[str]:
    return [f"{name}-page-{i}" for i in range(n)]


def test_dynamic_backend_is_a_real_hicache_storage(service, make_backend):
    backend, pool = make_backend(service.url)
    assert isinstance(backend, CacheServiceHiCacheStorage)
    assert isinstance(backend, HiCacheStorage)
    ns = backend.namespace("v1")
    assert (ns.dtype, ns.block_tokens, ns.layout) == ("bfloat16", 4, "sglang:page_first:v1")
    # 2 (K, V) * 2 layers * 4 tokens * 2 heads * 8 dims * 2 bytes
    assert backend._page_bytes == {"v1": 512, "flat": 512}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("zero_copy", ["on", "off"])
def test_v1_roundtrip(service, make_backend, layout, zero_copy):
    backend, pool = make_backend(service.url, layout, extra={"zero_copy": zero_copy})
    keys = keys_for(f"v1-{layout}-{zero_copy}", 5)
    src = page_indices(0, 5)
    pool.fill(src, seed=1)
    expected = pool.pages(src)
    assert backend.batch_exists(keys) == 0

    assert backend.batch_set_v1(keys, src) == [True] * 5
    transport = backend._bindings["v1"].transport
    assert isinstance(transport, ArenaTransport if zero_copy == "on" else HttpTransport)
    assert backend.batch_exists(keys) == 5
    assert backend.exists(keys[0]) and not backend.exists("never-stored")

    dst = page_indices(8, 5)
    assert all(not p.any() for p in pool.pages(dst))
    assert backend.batch_get_v1(keys, dst) == [True] * 5
    for want, got in zip(expected, pool.pages(dst), strict=True):
        assert torch.equal(want, got)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_storing_again_is_a_success_not_a_duplicate(service, make_backend, layout):
    backend, pool = make_backend(service.url, layout)
    keys = keys_for(f"again-{layout}", 3)
    pool.fill(page_indices(0, 3), seed=2)
    assert backend.batch_set_v1(keys[:2], page_indices(0, 2)) == [True, True]
    assert backend.batch_set_v1(keys, page_indices(0, 3)) == [True] * 3
    assert backend.batch_exists(keys) == 3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_partial_hit_fills_only_the_stored_prefix(service, make_backend, layout):
    backend, pool = make_backend(service.url, layout)
    keys = keys_for(f"partial-{layout}", 4)
    pool.fill(page_indices(0, 4), seed=3)
    expected = pool.pages(page_indices(0, 2))
    extra = HiCacheStorageExtraInfo(prefix_keys=None)
    assert backend.batch_set_v1(keys[:2], page_indices(0, 2), extra) == [True, True]

    assert backend.batch_exists(keys) == 2
    assert backend.batch_exists(keys[1:]) == 1
    dst = page_indices(8, 4)
    pool.kv_buffer.index_fill_(1 if layout == "page_first" else 2, dst, 7.0)
    assert backend.batch_get_v1(keys, dst) == [True, True, False, False]
    got = pool.pages(dst)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert all(bool((p == 7.0).all()) for p in got[2:]), "pages past the hit were touched"


def test_continuation_batch_chains_from_prefix_keys(service, make_backend):
    backend, pool = make_backend(service.url)
    keys = keys_for("chain", 4)
    pool.fill(page_indices(0, 4), seed=4)
    expected = pool.pages(page_indices(0, 4))
    assert backend.batch_set_v1(keys[:2], page_indices(0, 2)) == [True, True]
    extra = HiCacheStorageExtraInfo(prefix_keys=keys[:2])
    assert backend.batch_set_v1(keys[2:], page_indices(2, 2), extra) == [True, True]
    assert backend.batch_exists(keys) == 4
    assert backend.batch_get_v1(keys, page_indices(8, 4)) == [True] * 4
    for want, got in zip(expected, pool.pages(page_indices(8, 4)), strict=True):
        assert torch.equal(want, got)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flat_tensor_path_roundtrip(service, make_backend, layout):
    backend, pool = make_backend(service.url, layout, extra={"interface_v1": 0})
    keys = keys_for(f"flat-{layout}", 3)
    pool.fill(page_indices(0, 3), seed=5)
    values = [pool.get_data_page(i * pool.page_size) for i in range(3)]

    assert backend.set(keys[0], values[0]) is True
    assert backend.exists(keys[0]) and backend.batch_exists(keys) == 1
    assert backend.batch_set(keys[1:], values[1:]) is True
    assert backend.batch_exists(keys) == 3

    got = backend.get(keys[1], pool.get_dummy_flat_data_page())
    assert torch.equal(got, values[1])
    targets = [pool.get_dummy_flat_data_page() for _ in range(4)]
    out = backend.batch_get([*keys[:2], "missing", keys[2]], targets)
    assert torch.equal(out[0], values[0]) and torch.equal(out[1], values[1])
    assert out[2] is None and out[3] is None, "a miss ends the prefix"
    assert backend.get("missing", pool.get_dummy_flat_data_page()) is None

    # What SGLang does with a hit: write the flat page back into the host pool.
    pool.set_from_flat_data_page(8 * pool.page_size, out[1])
    assert torch.equal(pool.get_data_page(8 * pool.page_size), values[1])


def test_flat_and_v1_pages_never_mix(service, make_backend):
    """In layer_first the two paths order a page's bytes differently: separate namespaces."""
    model = "test-org/mixed-paths"
    v1, pool = make_backend(service.url, "layer_first", model=model)
    flat, _ = make_backend(service.url, "layer_first", model=model, extra={"interface_v1": 0})
    keys = keys_for("mix", 2)
    pool.fill(page_indices(0, 2), seed=6)
    assert v1.batch_set_v1(keys, page_indices(0, 2)) == [True, True]
    assert flat.batch_exists(keys) == 0
    assert flat.get(keys[0], pool.get_dummy_flat_data_page()) is None


def test_bad_extra_config_is_a_typed_error(service):
    with pytest.raises(BadRequest, match="unknown cacheservice extra_config keys"):
        CacheServiceHiCacheStorage(make_config(service.url, extra={"ulr": "x"}), {})
    with pytest.raises(BadRequest, match="zero_copy"):
        CacheServiceHiCacheStorage(make_config(service.url, extra={"zero_copy": "yes"}), {})
    cfg = make_config(service.url)
    cfg.model_name = None
    with pytest.raises(BadRequest, match='"model"'):
        CacheServiceHiCacheStorage(cfg, {})


def test_calls_before_the_host_pool_is_registered_are_misses(service):
    backend = CacheServiceHiCacheStorage(make_config(service.url), {})
    try:
        assert backend.batch_exists(["a", "b"]) == 0
        assert backend.get("a") is None
        pool = HostPool("page_first")
        assert backend.batch_set_v1(["a"], page_indices(0, 1)) == [False]
        backend.register_mem_pool_host(pool)
        assert backend.batch_set_v1(["a"], page_indices(0, 1)) == [True]
    finally:
        backend.close()


@pytest.mark.parametrize("zero_copy", ["on", "off"])
def test_read_continuing_a_prefix_the_engine_holds(service, make_backend, zero_copy):
    """SGLang prefetches the pages after its own cached prefix, and may store a batch whose
    prefix was never stored: both still hit, with the right bytes."""
    backend, pool = make_backend(service.url, extra={"zero_copy": zero_copy})
    keys = keys_for(f"mid-{zero_copy}", 6)
    pool.fill(page_indices(0, 6), seed=7)
    expected = pool.pages(page_indices(0, 6))
    assert backend.batch_set_v1(keys[:4], page_indices(0, 4)) == [True] * 4
    orphan = HiCacheStorageExtraInfo(prefix_keys=["never-stored-prefix"])
    assert backend.batch_set_v1(keys[4:], page_indices(4, 2), orphan) == [True, True]

    extra = HiCacheStorageExtraInfo(prefix_keys=keys[:2])
    assert backend.batch_exists(keys[2:], extra) == 4
    assert backend.batch_get_v1(keys[2:], page_indices(8, 4), extra) == [True] * 4
    for want, got in zip(expected[2:], pool.pages(page_indices(8, 4)), strict=True):
        assert torch.equal(want, got)


def test_corrupt_arena_slot_never_reaches_the_host_pool(service, make_backend):
    backend, pool = make_backend(service.url, extra={"zero_copy": "on"})
    keys = keys_for("corrupt", 3)
    pool.fill(page_indices(0, 3), seed=8)
    expected = pool.pages(page_indices(0, 3))
    assert backend.batch_set_v1(keys, page_indices(0, 3)) == [True] * 3

    bound = backend._bindings["v1"]
    hashed = backend._keys(bound, keys)
    acq = backend.client.acquire(bound.ns_id, hashed)
    backend.client.release(acq.lease)
    assert len(acq.slots) == 3
    with ArenaView.open(service.arena_path) as arena:
        payload = arena.payload(acq.slots[1], acq.lengths[1])
        payload[0] ^= 0xFF
        payload.release()

    # The flipped slot fails its checksum: it is served from the disk copy, or it is a miss.
    dst = page_indices(8, 3)
    hits = backend.batch_get_v1(keys, dst)
    assert hits[0] is True and hits in ([True, False, False], [True] * 3)
    for hit, want, got in zip(hits, expected, pool.pages(dst), strict=True):
        assert torch.equal(got, want) if hit else not got.any(), "corrupt bytes reached the pool"
