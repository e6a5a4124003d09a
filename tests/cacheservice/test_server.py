"""Every endpoint end to end against a real service subprocess, through the sync client and
the shared-memory arena; restart persistence; unix socket; /metrics as Prometheus text."""

from __future__ import annotations

import time

import pytest

from cacheservice.arena import ArenaView
from cacheservice.client import CacheClient
from index.hashing import ROOT_KEY, chunk_block_keys, chunk_key
from tests.factories import BLOCK_BYTES, make_namespace, make_payloads, make_prefix_keys
from tests.processes import SLOT_BYTES, ServiceProcess
from tiers.base import checksum


def test_register_namespace_describes_the_arena(service: ServiceProcess, client) -> None:
    ns = make_namespace()
    info = client.register(ns, BLOCK_BYTES)
    assert info.ns == ns.id and info.seed == ns.seed and info.block_bytes == BLOCK_BYTES
    assert info.arena["path"] == service.arena_path
    assert info.arena["slot_bytes"] == SLOT_BYTES and info.arena["num_slots"] > 0
    assert client.register(ns, BLOCK_BYTES) == info  # idempotent
    assert client.stats()["namespaces"]


def test_put_lookup_get_roundtrip(client: CacheClient) -> None:
    ns = make_namespace()
    info = client.register(ns, BLOCK_BYTES)
    keys, blocks = make_prefix_keys(ns, 6), make_payloads(6)
    assert client.lookup(info.ns, keys).hits == 0
    assert client.put_blocks(info.ns, keys[:4], b"".join(blocks[:4])) == 4
    hit = client.lookup(info.ns, keys)
    assert hit.hits == 4 and list(hit.tiers) == ["host"] * 4
    assert client.exists(info.ns, keys) == 4
    got = client.get_blocks(info.ns, keys)
    assert got.count == 4 and got.data == b"".join(blocks[:4])
    # The rest of the chain continues from the last stored key.
    assert client.put_blocks(info.ns, keys[4:], b"".join(blocks[4:]), parent=keys[3]) == 2
    assert client.lookup(info.ns, keys).hits == 6


def test_get_blocks_without_prefix_reports_present(client: CacheClient) -> None:
    ns = make_namespace()
    info = client.register(ns, BLOCK_BYTES)
    keys, blocks = make_prefix_keys(ns, 3, seed=1), make_payloads(3, seed=1)
    assert client.put_blocks(info.ns, [keys[1]], blocks[1], flat=True) == 1
    assert client.get_blocks(info.ns, keys).count == 0  # block 0 missing: empty prefix
    got = client.get_blocks(info.ns, keys, prefix=False)
    assert list(got.present) == [False, True, False]
    assert got.count == 1 and got.data == blocks[1]


def test_flat_keys_each_hit_alone(client: CacheClient) -> None:
    ns = make_namespace()
    info = client.register(ns, BLOCK_BYTES)
    keys, blocks = make_prefix_keys(ns, 3, seed=2), make_payloads(3, seed=2)
    assert client.put_blocks(info.ns, keys, b"".join(blocks), flat=True) == 3
    assert client.exists(info.ns, keys) == 3
    assert client.exists(info.ns, keys[1:]) == 2


def test_reserve_commit_acquire_release_through_the_arena(client: CacheClient) -> None:
    ns = make_namespace()
    info = client.register(ns, BLOCK_BYTES)
    keys, blocks = make_prefix_keys(ns, 3, seed=3), make_payloads(3, seed=3)
    arena = ArenaView.open(info.arena["path"])
    try:
        res = client.reserve(info.ns, keys, ROOT_KEY)
        assert len(res.slots) == 3 and all(s is not None for s in res.slots)
        for slot, block in zip(res.slots, blocks, strict=True):
            arena.payload(slot, len(block))[:] = block  # zero copy write into the slot
        assert client.lookup(info.ns, keys).hits == 0  # invisible until committed
        assert client.commit(res.lease, [True, True, False]) == 2
        assert client.lookup(info.ns, keys).hits == 2
        again = client.reserve(info.ns, keys, ROOT_KEY)
        assert again.slots[0] is None and again.slots[1] is None  # already stored: skip
        client.commit(again.lease, [False] * 3)

        acq = client.acquire(info.ns, keys)
        assert len(acq.slots) == 2 and list(acq.lengths) == [BLOCK_BYTES] * 2
        for i, slot in enumerate(acq.slots):
            data = bytes(arena.payload(slot, acq.lengths[i]))
            assert data == blocks[i] and checksum(data) == acq.checksums[i]
        assert client.stats()["leases"] >= 1
        assert client.release(acq.lease) == 2
    finally:
        arena.close()


def test_chunks_register_and_lookup(client: CacheClient) -> None:
    ns = make_namespace()
    info = client.register(ns, BLOCK_BYTES)
    tokens = list(range(1000, 1040))  # 2.5 blocks: the tail block is partial
    ck = chunk_key(tokens, ns.seed)
    bkeys = chunk_block_keys(tokens, ns.seed, ns.block_tokens)
    blocks = make_payloads(len(bkeys), seed=4)
    assert client.register_chunk(info.ns, ck, 40, 128, bkeys, b"".join(blocks))
    other = chunk_key([1, 2, 3], ns.seed)
    entries = client.lookup_chunks(info.ns, [ck, other])
    assert entries[1] is None
    assert entries[0].num_tokens == 40 and entries[0].start_pos == 128
    assert list(entries[0].keys) == bkeys
    got = client.get_blocks(info.ns, bkeys)
    assert got.count == len(bkeys) and got.data == b"".join(blocks)


def test_stats_count_hits_and_stores(client: CacheClient) -> None:
    ns = make_namespace()
    info = client.register(ns, BLOCK_BYTES)
    before = client.stats()
    keys = make_prefix_keys(ns, 2, seed=5)
    client.put_blocks(info.ns, keys, b"".join(make_payloads(2, seed=5)))
    client.get_blocks(info.ns, keys)
    after = client.stats()
    assert after["stores"] >= before["stores"] + 2
    assert after["blocks"]["host"] >= before["blocks"]["host"] + 2
    assert after["capacity"]["host"] > 0 and "disk" in after["capacity"]


def test_metrics_is_prometheus_text(client: CacheClient) -> None:
    from prometheus_client import parser

    ns = make_namespace()
    info = client.register(ns, BLOCK_BYTES)
    client.lookup(info.ns, make_prefix_keys(ns, 2))
    families = {f.name: f for f in parser.text_string_to_metric_families(client.metrics())}
    requests = families["cacheservice_requests"].samples
    assert any(
        s.labels == {"endpoint": "/v1/lookup", "status": "200"} and s.value >= 1 for s in requests
    )
    latency = families["cacheservice_request_seconds"]
    assert latency.type == "histogram"
    inf = [s for s in latency.samples if s.labels.get("le") == "+Inf"]
    assert inf and all(s.value >= 1 for s in inf)
    blocks = {s.labels["tier"]: s.value for s in families["cacheservice_blocks"].samples}
    assert set(blocks) >= {"host", "disk"}
    stats = client.stats()
    for name in ("hits", "misses", "stores", "evictions", "corrupt", "promotions",
                 "written_down", "dropped", "io_error", "no_space", "fenced"):  # fmt: skip
        assert families[f"cacheservice_{name}"].type == "counter"
    # every stats counter is exported, and the scrape reads the same numbers
    assert families["cacheservice_stores"].samples[0].value == stats["stores"]
    assert {s.labels["tier"] for s in families["cacheservice_fill_ratio"].samples} >= {"host"}
    assert "cacheservice_hit_ratio" in families and "cacheservice_tier_errors" in families


def test_restart_on_same_disk_still_hits(make_service) -> None:
    svc = make_service("persist")
    ns = make_namespace()
    keys, blocks = make_prefix_keys(ns, 5, seed=6), make_payloads(5, seed=6)
    with svc.client() as c:
        info = c.register(ns, BLOCK_BYTES)
        assert c.put_blocks(info.ns, keys, b"".join(blocks)) == 5
    svc.restart()  # SIGTERM drains write-down to disk before exit
    with svc.client() as c:
        hit = c.lookup(info.ns, keys)  # the namespace survived the restart too
        assert hit.hits == 5 and set(hit.tiers) <= {"disk", "host"}
        got = c.get_blocks(info.ns, keys)
        assert got.count == 5 and got.data == b"".join(blocks)
        acq = c.acquire(info.ns, keys)  # promoted back into the arena
        arena = ArenaView.open(svc.arena_path)
        try:
            assert [bytes(arena.payload(s, BLOCK_BYTES)) for s in acq.slots] == blocks
        finally:
            arena.close()
        c.release(acq.lease)


def test_unix_socket_mode(make_service) -> None:
    svc = make_service("unix", unix_socket=True)
    assert svc.url.startswith("unix://")
    ns = make_namespace()
    with svc.client() as c:
        assert c.health()
        info = c.register(ns, BLOCK_BYTES)
        keys = make_prefix_keys(ns, 2)
        assert c.put_blocks(info.ns, keys, b"".join(make_payloads(2))) == 2
    with CacheClient(svc.http_url) as tcp:  # TCP serves the same state
        assert tcp.lookup(info.ns, keys).hits == 2


@pytest.mark.redis
def test_redis_tier_shares_blocks_between_services(make_service, tmp_path) -> None:
    from tests.processes import start_redis

    redis = start_redis(tmp_path / "redis")
    try:
        svc = make_service("redis", extra=["--redis-url", redis.url, "--redis-bytes", "8MiB"])
        ns = make_namespace()
        keys, blocks = make_prefix_keys(ns, 3, seed=9), make_payloads(3, seed=9)
        with svc.client() as c:
            info = c.register(ns, BLOCK_BYTES)
            assert c.put_blocks(info.ns, keys, b"".join(blocks)) == 3
            stats = c.stats()
            assert stats["capacity"]["redis"] == 8 << 20
        assert svc.stop() == 0, svc.output()  # drains write-down into Redis
        # Another host: its own arena and disk, the same Redis. It finds the blocks there.
        other = make_service("other", extra=["--redis-url", redis.url])
        with other.client() as c:
            info = c.register(ns, BLOCK_BYTES)
            hit = c.lookup(info.ns, keys)
            assert hit.hits == 3 and "redis" in hit.tiers
            assert c.get_blocks(info.ns, keys).data == b"".join(blocks)
    finally:
        redis.kill()


def test_unreleased_lease_expires(client: CacheClient) -> None:
    ns = make_namespace()
    info = client.register(ns, BLOCK_BYTES)
    keys = make_prefix_keys(ns, 2, seed=10)
    client.put_blocks(info.ns, keys, b"".join(make_payloads(2, seed=10)))
    before = client.stats()["leases"]
    acq = client.acquire(info.ns, keys, lease_ms=50)  # an engine that crashed mid-read
    assert len(acq.slots) == 2 and client.stats()["leases"] == before + 1
    deadline = time.monotonic() + 5
    while client.stats()["leases"] > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.stats()["leases"] == before
    assert client.release(acq.lease) == 0  # already released by the service
