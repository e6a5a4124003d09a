"""``acquire(flat=True)``: leases keys that continue a prefix the caller already holds (their
parents are not in the request), promoting them into the arena like a prefix acquire, while
``flat=False`` keeps matching from the root only. In-process service and real subprocess."""

from __future__ import annotations

import pytest
import xxhash

from cacheservice.arena import ArenaView
from cacheservice.client import AsyncCacheClient, CacheClient
from cacheservice.service import CacheService
from index.hashing import ROOT_KEY
from tests.factories import (
    BLOCK_BYTES,
    INPROC_BB,
    INPROC_NS,
    checked,
    inproc_data,
    inproc_keys,
    make_disk_only,
    make_inproc_service,
    make_namespace,
    make_payloads,
    make_prefix_keys,
)
from tests.processes import ServiceProcess


def leased_bytes(svc: CacheService, slots: list[int], lengths: list[int]) -> list[bytes]:
    return [bytes(svc.host.payload_view(s, n)) for s, n in zip(slots, lengths, strict=True)]


async def test_flat_leases_continuation_keys_prefix_does_not(tmp_path):
    svc = await make_inproc_service(tmp_path)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    keys, data = inproc_keys(5), inproc_data(5)
    await svc.put_blocks(INPROC_NS.id, keys, ROOT_KEY, data)

    plain = await svc.acquire(INPROC_NS.id, keys[2:])
    assert plain.slots == [] and svc.release(plain.lease) == 0  # unchanged: root paths only
    a = await svc.acquire(INPROC_NS.id, keys[2:], flat=True)
    assert len(a.slots) == 3 and a.lengths == [INPROC_BB] * 3
    got = leased_bytes(svc, a.slots, a.lengths)
    assert got == [data[i * INPROC_BB : (i + 1) * INPROC_BB] for i in range(2, 5)]
    assert a.checksums == [xxhash.xxh3_64_intdigest(b) for b in got]
    assert [svc.tree.get(k).pins for k in keys] == [0, 0, 1, 1, 1]
    await checked(svc)
    assert svc.release(a.lease) == 3 and svc.release(a.lease) == 0
    assert all(svc.tree.get(k).pins == 0 for k in keys)
    await checked(svc)
    await svc.close()


async def test_flat_stops_at_the_first_missing_key(tmp_path):
    svc = await make_inproc_service(tmp_path)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    flat = [bytes([i]) * 16 for i in range(1, 4)]  # each stored with parent ROOT_KEY
    await svc.put_blocks(INPROC_NS.id, flat, ROOT_KEY, inproc_data(3, 4), flat=True)
    plain = await svc.acquire(INPROC_NS.id, flat)
    assert len(plain.slots) == 1  # flat[1] is not flat[0]'s child
    svc.release(plain.lease)
    whole = await svc.acquire(INPROC_NS.id, flat, flat=True)
    assert len(whole.slots) == 3
    svc.release(whole.lease)
    gap = await svc.acquire(
        INPROC_NS.id, [flat[2], inproc_keys(1, start=700)[0], flat[0]], flat=True
    )
    assert len(gap.slots) == 1 and svc.tree.get(flat[0]).pins == 0
    assert svc.stats()["leases"] == 1  # only gap is open
    svc.release(gap.lease)
    await checked(svc)
    await svc.close()


async def test_flat_promotes_from_disk_and_pins_against_pressure(tmp_path):
    svc = await make_inproc_service(tmp_path, host_slots=4)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    keys, data = await make_disk_only(svc)
    promotions = svc.stats()["promotions"]

    a = await svc.acquire(INPROC_NS.id, keys[1:], flat=True)
    assert len(a.slots) == 3 and svc.stats()["promotions"] == promotions + 3
    for i in range(4):  # more than fits beside the lease: only unpinned blocks may go
        await svc.put_blocks(
            INPROC_NS.id, inproc_keys(1, start=9000 + 10 * i), ROOT_KEY, inproc_data(1, i)
        )
    assert [svc.host.slot_of(k) for k in keys[1:]] == a.slots
    assert b"".join(leased_bytes(svc, a.slots, a.lengths)) == data[INPROC_BB:]
    await checked(svc)
    svc.release(a.lease)
    await checked(svc)
    await svc.close()


# -- through the clients, against the real service subprocess ------------------------------


def test_client_flat_acquire_reads_continuation_from_the_arena(client: CacheClient) -> None:
    ns = make_namespace()
    info = client.register(ns, BLOCK_BYTES)
    keys, blocks = make_prefix_keys(ns, 5, seed=21), make_payloads(5, seed=21)
    assert client.put_blocks(info.ns, keys, b"".join(blocks)) == 5
    plain = client.acquire(info.ns, keys[3:])
    assert plain.slots == [] and client.release(plain.lease) == 0
    acq = client.acquire(info.ns, keys[3:], lease_ms=5000, flat=True)
    with ArenaView.open(info.arena["path"]) as arena:
        got = [bytes(arena.payload(s, n)) for s, n in zip(acq.slots, acq.lengths, strict=True)]
    assert got == blocks[3:]
    assert acq.checksums == [xxhash.xxh3_64_intdigest(b) for b in got]
    assert client.stats()["leases"] >= 1
    assert client.release(acq.lease) == 2


async def test_async_client_flat_acquire(service: ServiceProcess) -> None:
    ns = make_namespace()
    keys, blocks = make_prefix_keys(ns, 3, seed=22), make_payloads(3, seed=22)
    async with AsyncCacheClient(service.url) as c:
        info = await c.register(ns, BLOCK_BYTES)
        assert await c.put_blocks(info.ns, keys, b"".join(blocks)) == 3
        acq = await c.acquire(info.ns, keys[1:], flat=True)
        assert len(acq.slots) == 2 and acq.lengths == [BLOCK_BYTES] * 2
        assert await c.release(acq.lease) == 2
        plain = await c.acquire(info.ns, keys[1:])
        assert plain.slots == [] and await c.release(plain.lease) == 0


@pytest.mark.redis
def test_flat_acquire_finds_continuation_only_in_redis(make_service, tmp_path) -> None:
    from tests.processes import start_redis

    redis = start_redis(tmp_path / "redis")
    try:
        writer = make_service("writer", extra=["--redis-url", redis.url])
        ns = make_namespace()
        keys, blocks = make_prefix_keys(ns, 4, seed=23), make_payloads(4, seed=23)
        with writer.client() as c:
            info = c.register(ns, BLOCK_BYTES)
            assert c.put_blocks(info.ns, keys, b"".join(blocks)) == 4
        assert writer.stop() == 0, writer.output()  # drains write-down into Redis
        # Another host: its own arena and disk, the same Redis.
        reader = make_service("reader", extra=["--redis-url", redis.url])
        with reader.client() as c:
            info = c.register(ns, BLOCK_BYTES)
            acq = c.acquire(info.ns, keys[2:], flat=True)
            with ArenaView.open(info.arena["path"]) as arena:
                got = [bytes(arena.payload(s, BLOCK_BYTES)) for s in acq.slots]
            assert got == blocks[2:]
            assert c.release(acq.lease) == 2
            assert c.stats()["promotions"] == 2
    finally:
        redis.kill()
