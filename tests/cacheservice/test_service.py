from __future__ import annotations

import pytest
import xxhash

from cacheservice.arena import ArenaView
from cacheservice.errors import (
    BadRequest,
    NamespaceConflict,
    Overloaded,
    TooLarge,
    UnknownNamespace,
    WrongBlockSize,
)
from index.hashing import ROOT_KEY, Namespace, chunk_block_keys, chunk_key
from tests.factories import (
    INPROC_BB,
    INPROC_NS,
    INPROC_SLOT,
    checked,
    corrupt_on_disk,
    inproc_data,
    inproc_keys,
    inproc_tokens,
    make_disk_only,
    make_inproc_service,
)


async def test_register_validates(tmp_path):
    svc = await make_inproc_service(tmp_path)
    info = svc.register_namespace(INPROC_NS, INPROC_BB)
    assert info.ns == INPROC_NS.id and info.seed == INPROC_NS.seed and info.block_bytes == INPROC_BB
    assert info.arena["slot_bytes"] == INPROC_SLOT and info.arena["num_slots"] == 8
    assert svc.register_namespace(INPROC_NS, INPROC_BB) == info  # idempotent
    with pytest.raises(NamespaceConflict):
        svc.register_namespace(INPROC_NS, INPROC_BB * 2)
    with pytest.raises(TooLarge, match="--slot-bytes 8192"):
        svc.register_namespace(Namespace("big", "f", "l", 4), 5000)
    with pytest.raises(BadRequest):
        svc.register_namespace(Namespace("zero", "f", "l", 4), 0)
    with pytest.raises(UnknownNamespace):
        await svc.lookup("0" * 16, inproc_keys(1))
    with pytest.raises(BadRequest):
        await svc.lookup(INPROC_NS.id, b"x" * 17)
    with pytest.raises(BadRequest):
        await svc.lookup(INPROC_NS.id, [b"short"])
    small = await make_inproc_service(tmp_path, name="b", disk=False, max_keys=2)
    small.register_namespace(INPROC_NS, INPROC_BB)
    with pytest.raises(TooLarge, match="max-keys"):
        await small.lookup(INPROC_NS.id, inproc_keys(3))
    with pytest.raises(WrongBlockSize):
        await svc.put_blocks(INPROC_NS.id, inproc_keys(2), ROOT_KEY, inproc_data(1))
    assert svc.stats()["stores"] == 0 and len(svc.tree) == 0  # bad requests stored nothing
    await checked(svc)
    await svc.close()
    await small.close()


async def test_reserve_commit_acquire_through_arena(tmp_path):
    svc = await make_inproc_service(tmp_path)
    info = svc.register_namespace(INPROC_NS, INPROC_BB)
    keys = inproc_keys(3)
    data = inproc_data(3)
    r = await svc.reserve(INPROC_NS.id, keys, ROOT_KEY)
    assert None not in r.slots and len(set(r.slots)) == 3
    assert (await svc.lookup(INPROC_NS.id, keys)).hits == 0  # invisible until committed
    with ArenaView.open(info.arena["path"]) as arena:
        for i, slot in enumerate(r.slots):
            arena.payload(slot, INPROC_BB)[:] = data[i * INPROC_BB : (i + 1) * INPROC_BB]
        assert await svc.commit(r.lease) == 3
        look = await svc.lookup(INPROC_NS.id, keys + inproc_keys(1, start=900))
        assert look.hits == 3 and look.tiers == ["host"] * 3
        a = await svc.acquire(INPROC_NS.id, keys)
        assert len(a.slots) == 3 and a.lengths == [INPROC_BB] * 3
        for i, (slot, csum) in enumerate(zip(a.slots, a.checksums, strict=True)):
            got = bytes(arena.payload(slot, INPROC_BB))
            assert (
                got == data[i * INPROC_BB : (i + 1) * INPROC_BB]
                and xxhash.xxh3_64_intdigest(got) == csum
            )
        assert all(svc.tree.get(k).pins == 1 for k in keys)
        await checked(svc)
        assert svc.release(a.lease) == 3 and svc.release(a.lease) == 0
    assert all(svc.tree.get(k).pins == 0 for k in keys)
    again = await svc.reserve(INPROC_NS.id, keys, ROOT_KEY)
    assert again.slots == [None] * 3  # already stored: skip
    assert await svc.commit(again.lease) == 0
    await checked(svc)
    await svc.close()


async def test_commit_partial_and_abort(tmp_path):
    svc = await make_inproc_service(tmp_path, disk=False)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    keys = inproc_keys(3)
    free = svc.host.free_slots
    r = await svc.reserve(INPROC_NS.id, keys, ROOT_KEY)
    with pytest.raises(BadRequest):
        await svc.commit(r.lease, [True])
    assert await svc.commit(r.lease, [True, False, True]) == 2
    assert svc.host.free_slots == free - 2
    assert (await svc.lookup(INPROC_NS.id, keys)).hits == 1  # block 2 hangs under a missing parent
    await checked(svc)
    r2 = await svc.reserve(INPROC_NS.id, inproc_keys(2, start=100), ROOT_KEY)
    assert svc.release(r2.lease) == 2 and svc.host.free_slots == free - 2
    # a concurrent reserve of the same key gets no slot while the first lease holds it
    r3 = await svc.reserve(INPROC_NS.id, inproc_keys(1, start=200), ROOT_KEY)
    r4 = await svc.reserve(INPROC_NS.id, inproc_keys(1, start=200), ROOT_KEY)
    assert r3.slots[0] is not None and r4.slots == [None]
    await checked(svc)
    await svc.close()


async def test_lease_expiry_releases_and_aborts(tmp_path):
    svc = await make_inproc_service(tmp_path, disk=False, lease_ms=60_000)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    keys = inproc_keys(2)
    await svc.put_blocks(INPROC_NS.id, keys, ROOT_KEY, inproc_data(2))
    a = await svc.acquire(INPROC_NS.id, keys, lease_ms=50)
    tail = await svc.acquire(INPROC_NS.id, keys[1:], lease_ms=50, flat=True)
    assert [svc.tree.get(k).pins for k in keys] == [1, 2]
    free = svc.host.free_slots
    r = await svc.reserve(INPROC_NS.id, inproc_keys(2, start=40), ROOT_KEY)
    assert svc.host.free_slots == free - 2
    assert svc.expire_leases() == 0
    import time

    assert svc.expire_leases(time.monotonic() + 61) == 3
    # The expired writer may still write: its slots cool instead of going straight back.
    assert svc.host.free_slots == free - 2 and svc.host.cooling_slots == 2
    assert all(svc.tree.get(k).pins == 0 for k in keys)
    assert await svc.commit(r.lease) == 0 and svc.release(a.lease) == 0
    assert svc.release(tail.lease) == 0
    assert svc.stats()["leases"] == 0
    await checked(svc)
    await svc.close()


async def test_expiry_task_runs(tmp_path):
    import asyncio

    svc = await make_inproc_service(tmp_path, disk=False, lease_ms=100)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    r = await svc.reserve(INPROC_NS.id, inproc_keys(1), ROOT_KEY)
    assert svc.stats()["leases"] == 1
    await asyncio.sleep(0.4)
    assert svc.stats()["leases"] == 0 and await svc.commit(r.lease) == 0
    await svc.close()


async def test_acquired_blocks_survive_host_pressure(tmp_path):
    svc = await make_inproc_service(tmp_path, host_slots=4, disk=False)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    keys = inproc_keys(2)
    data = inproc_data(2)
    await svc.put_blocks(INPROC_NS.id, keys, ROOT_KEY, data)
    a = await svc.acquire(INPROC_NS.id, keys)
    for i in range(6):  # far more than fits: only unpinned blocks may go
        await svc.put_blocks(
            INPROC_NS.id, inproc_keys(1, start=1000 + 10 * i), ROOT_KEY, inproc_data(1, i)
        )
    assert [svc.host.slot_of(k) for k in keys] == a.slots
    assert bytes(svc.host.payload_view(a.slots[1], INPROC_BB)) == data[INPROC_BB:]
    svc.release(a.lease)
    assert svc.stats()["evictions"] >= 4
    await checked(svc)
    await svc.close()


async def test_put_get_blocks_prefix_flat_and_exists(tmp_path):
    svc = await make_inproc_service(tmp_path)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    keys = inproc_keys(4)
    data = inproc_data(4)
    assert await svc.put_blocks(INPROC_NS.id, keys[:3], ROOT_KEY, data[: 3 * INPROC_BB]) == 3
    got = await svc.get_blocks(INPROC_NS.id, keys)
    assert (
        got.count == 3 and got.data == data[: 3 * INPROC_BB] and got.present == [True] * 3 + [False]
    )
    sparse = await svc.get_blocks(INPROC_NS.id, [keys[3], keys[1]], prefix=False)
    assert sparse.count == 1 and sparse.present == [False, True]
    assert sparse.data == data[INPROC_BB : 2 * INPROC_BB]
    flat = [bytes([i]) * 16 for i in range(1, 4)]
    assert await svc.put_blocks(INPROC_NS.id, flat, ROOT_KEY, inproc_data(3, 9), flat=True) == 3
    assert await svc.exists(INPROC_NS.id, flat) == 3
    assert await svc.exists(INPROC_NS.id, flat[:1] + keys[3:] + flat[1:]) == 1
    assert (await svc.get_blocks(INPROC_NS.id, flat)).data == inproc_data(3, 9)
    assert await svc.put_blocks(INPROC_NS.id, keys, ROOT_KEY, data) == 4  # 3 already there + 1
    assert svc.stats()["stores"] == 7
    await checked(svc)
    await svc.close()


async def test_restart_rebuilds_index_namespaces_and_chunks(tmp_path):
    svc = await make_inproc_service(tmp_path)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    keys = inproc_keys(5)
    data = inproc_data(5)
    await svc.put_blocks(INPROC_NS.id, keys, ROOT_KEY, data)
    doc = inproc_tokens(2, start=7000)[:6]  # 6 tokens: one full block + a partial one
    ck, ckeys = chunk_key(doc, INPROC_NS.seed), chunk_block_keys(doc, INPROC_NS.seed, 4)
    assert await svc.register_chunk(INPROC_NS.id, ck, 6, 12, ckeys, inproc_data(2, 5))
    await svc.drain()
    await svc.close()

    again = await make_inproc_service(tmp_path, name="b")
    look = await again.lookup(INPROC_NS.id, keys)  # the namespace is known without re-registering
    assert look.hits == 5 and look.tiers == ["disk"] * 5
    a = await again.acquire(INPROC_NS.id, keys)
    assert len(a.slots) == 5
    assert bytes(again.host.payload_view(a.slots[4], INPROC_BB)) == data[4 * INPROC_BB :]
    again.release(a.lease)
    [entry] = again.lookup_chunks(INPROC_NS.id, [ck])
    assert entry.start_pos == 12 and entry.keys == ckeys and entry.resident
    assert (await again.get_blocks(INPROC_NS.id, ckeys)).data == inproc_data(2, 5)
    await checked(again)
    await again.close()


async def test_chunks_register_and_lookup(tmp_path):
    svc = await make_inproc_service(tmp_path, disk=False)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    doc = inproc_tokens(3, start=500)
    ck, ckeys = chunk_key(doc, INPROC_NS.seed), chunk_block_keys(doc, INPROC_NS.seed, 4)
    assert not await svc.register_chunk(INPROC_NS.id, ck, 12, 0, ckeys)  # blocks not stored yet
    with pytest.raises(BadRequest, match="chunk_block_keys"):
        await svc.register_chunk(INPROC_NS.id, ck, 12, 0, ckeys[:2])
    with pytest.raises(BadRequest):
        await svc.register_chunk(INPROC_NS.id, ck, 12, -1, ckeys)
    r = await svc.reserve(INPROC_NS.id, ckeys, ck)
    await svc.commit(r.lease)
    assert await svc.register_chunk(INPROC_NS.id, ck, 12, 40, ckeys)
    entries = svc.lookup_chunks(INPROC_NS.id, [ck, b"\x01" * 16])
    assert entries[0].num_tokens == 12 and entries[0].resident and entries[1] is None
    assert (await svc.lookup(INPROC_NS.id, ckeys)).hits == 3
    await svc.put_blocks(
        INPROC_NS.id, inproc_keys(8, 3000), ROOT_KEY, inproc_data(8)
    )  # evicts chunk
    # The chunk leaves with its blocks (it no longer holds index memory or a manifest).
    assert svc.lookup_chunks(INPROC_NS.id, [ck])[0] is None and svc.stats()["chunks"] == 0
    await checked(svc)
    await svc.close()


@pytest.mark.parametrize(("start", "flat"), [(0, False), (0, True), (1, True)])
async def test_corrupt_disk_block_shortens_acquire(tmp_path, start, flat):
    svc = await make_inproc_service(tmp_path, host_slots=4)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    keys, _ = await make_disk_only(svc)
    corrupt_on_disk(svc, keys[2])
    a = await svc.acquire(INPROC_NS.id, keys[start:], flat=flat)
    assert len(a.slots) == 2 - start and svc.stats()["corrupt"] == 1
    assert svc.tree.get(keys[2]) is None and svc.tree.get(keys[1]).pins == 1
    svc.release(a.lease)
    assert (await svc.lookup(INPROC_NS.id, keys)).hits == 2
    await checked(svc)
    await svc.close()


async def test_stats_shape(tmp_path):
    svc = await make_inproc_service(tmp_path)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    await svc.put_blocks(INPROC_NS.id, inproc_keys(2), ROOT_KEY, inproc_data(2))
    await svc.lookup(INPROC_NS.id, inproc_keys(3))
    await svc.drain()
    s = svc.stats()
    assert s["namespaces"] == 1 and s["blocks"] == {"host": 2, "disk": 2}
    assert s["bytes"]["host"] == 2 * INPROC_SLOT and s["capacity"]["host"] == 8 * INPROC_SLOT
    assert s["hits"] == 2 and s["misses"] == 1 and s["stores"] == 2
    for k in ("evictions", "corrupt", "leases"):
        assert s[k] == 0
    await svc.close()


async def test_a_new_prompt_never_evicts_its_own_head(tmp_path):
    """Storing prompt B a few blocks per reserve (as an engine does, step by step) into a full
    arena with no lower tier evicts the older prompt A, never B's own earlier blocks: B's
    chain stays a hit from its first block."""
    svc = await make_inproc_service(tmp_path, host_slots=8, disk=False)
    svc.register_namespace(INPROC_NS, INPROC_BB)
    a = inproc_keys(6)
    await svc.put_blocks(INPROC_NS.id, a, ROOT_KEY, inproc_data(6))
    b = inproc_keys(12, start=7000)
    for i in range(0, 12, 3):
        r = await svc.reserve(INPROC_NS.id, b[i : i + 3], b[i - 1] if i else ROOT_KEY)
        if r.lease:
            await svc.commit(r.lease)
        stored = sum(s is not None for s in r.slots)
        assert (await svc.lookup(INPROC_NS.id, b)).hits >= min(i + stored, 3), i
    kept_b = (await svc.lookup(INPROC_NS.id, b)).hits
    kept_a = (await svc.lookup(INPROC_NS.id, a)).hits
    assert kept_b >= 4 and kept_b > kept_a, (kept_b, kept_a)
    await checked(svc)
    await svc.close()


async def test_namespace_count_is_bounded(tmp_path):
    svc = await make_inproc_service(tmp_path, disk=False)
    svc.namespaces.max_namespaces = 5
    for i in range(5):
        svc.register_namespace(Namespace(f"m{i}", "f16", "l", 4), INPROC_BB)
    with pytest.raises(Overloaded, match="namespaces"):
        svc.register_namespace(Namespace("one-too-many", "f16", "l", 4), INPROC_BB)
    assert svc.register_namespace(Namespace("m0", "f16", "l", 4), INPROC_BB)  # known: fine
    await svc.close()


async def test_a_length_only_lookup_agrees_with_the_full_one(tmp_path):
    """lookup(tiers=False) answers by binary search over the key blob: the same hits as the
    edge-by-edge match after evictions and with a disk copy, the same refusals of malformed
    blobs, and no refusal of a harmless probe (a repeat or the root simply do not match)."""
    svc = await make_inproc_service(tmp_path, host_slots=4)
    info = svc.register_namespace(INPROC_NS, INPROC_BB)
    keys = inproc_keys(8)
    await svc.put_blocks(info.ns, keys[:6], ROOT_KEY, inproc_data(6))  # 2 leave host for disk
    await svc.drain()
    for n in range(9):
        blob = b"".join(keys[:n])
        full = await svc.lookup(info.ns, blob)
        short = await svc.lookup(info.ns, blob, tiers=False)
        assert short.hits == full.hits == min(n, 6) and short.tiers == []
    assert (await svc.lookup(info.ns, keys[0] * 2, tiers=False)).hits == 1
    assert (await svc.lookup(info.ns, ROOT_KEY + keys[0], tiers=False)).hits == 0
    with pytest.raises(BadRequest):
        await svc.lookup(info.ns, b"x" * 17, tiers=False)
    with pytest.raises(TooLarge):
        await svc.lookup(info.ns, bytes(16) * (svc.max_keys + 1), tiers=False)
    await checked(svc)
    await svc.close()
