"""Same host, the arena is mapped: pages that continue a prefix the engine holds are read zero
copy through a flat acquire lease, never through ``/v1/blocks/get``, bit for bit; a corrupt
slot is still caught by its checksum and never reaches the host pool."""

from __future__ import annotations

import re

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo

from cacheservice.arena import ArenaView
from cacheservice.client import CacheClient
from connectors.sglang.transport import ArenaTransport
from tests.connectors.sglang.pools import page_indices

LAYOUTS = ["page_first", "layer_first"]


def blocks_get_calls(client: CacheClient) -> int:
    """``/v1/blocks/get`` requests the service has answered, from its own metrics."""
    pattern = r'cacheservice_requests_total\{endpoint="/v1/blocks/get",status="\d+"\} (\d+)'
    return sum(int(n) for n in re.findall(pattern, client.metrics()))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_continuation_pages_are_read_zero_copy(service, make_backend, layout):
    backend, pool = make_backend(service.url, layout, extra={"zero_copy": "on"})
    keys = [f"zc-{layout}-{i}" for i in range(6)]
    pool.fill(page_indices(0, 6), seed=31)
    expected = pool.pages(page_indices(0, 6))
    assert backend.batch_set_v1(keys[:4], page_indices(0, 4)) == [True] * 4
    orphan = HiCacheStorageExtraInfo(prefix_keys=["zc-never-stored"])  # a chain of its own
    assert backend.batch_set_v1(keys[4:], page_indices(4, 2), orphan) == [True, True]
    transport = backend._bindings["v1"].transport
    assert isinstance(transport, ArenaTransport)
    before = blocks_get_calls(backend.client), transport.pages_zero_copy, transport.pages_http
    leases = backend.client.stats()["leases"]

    extra = HiCacheStorageExtraInfo(prefix_keys=keys[:2])
    dst = page_indices(8, 4)
    assert backend.batch_get_v1(keys[2:], dst, extra) == [True] * 4
    for want, got in zip(expected[2:], pool.pages(dst), strict=True):
        assert torch.equal(want, got)
    after = blocks_get_calls(backend.client), transport.pages_zero_copy, transport.pages_http
    assert after == (before[0], before[1] + 4, before[2]), "a continuation page took HTTP"
    assert backend.client.stats()["leases"] == leases, "the read leaked its lease"


def test_corrupt_continuation_slot_is_caught(service, make_backend):
    backend, pool = make_backend(service.url, extra={"zero_copy": "on"})
    keys = [f"zc-corrupt-{i}" for i in range(5)]
    pool.fill(page_indices(0, 5), seed=32)
    expected = pool.pages(page_indices(0, 5))
    assert backend.batch_set_v1(keys, page_indices(0, 5)) == [True] * 5

    bound = backend._bindings["v1"]
    hashed = backend._keys(bound, keys[2:])
    acq = backend.client.acquire(bound.ns_id, hashed, flat=True)
    assert len(acq.slots) == 3
    backend.client.release(acq.lease)
    with ArenaView.open(service.arena_path) as arena:
        payload = arena.payload(acq.slots[1], acq.lengths[1])  # keys[3]
        payload[0] ^= 0xFF
        payload.release()

    transport = bound.transport
    zero_copy, gets = transport.pages_zero_copy, blocks_get_calls(backend.client)
    dst = page_indices(8, 3)
    extra = HiCacheStorageExtraInfo(prefix_keys=keys[:2])
    hits = backend.batch_get_v1(keys[2:], dst, extra)
    # keys[2] zero copy; keys[3] fails its checksum, so it and keys[4] go over HTTP, where the
    # service re-reads keys[3] from disk or answers a miss.
    assert hits in ([True, False, False], [True] * 3)
    assert transport.pages_zero_copy == zero_copy + 1
    assert blocks_get_calls(backend.client) == gets + 1
    for hit, want, got in zip(hits, expected[2:], pool.pages(dst), strict=True):
        assert torch.equal(got, want) if hit else not got.any(), "corrupt bytes reached the pool"
