from __future__ import annotations

import os
from pathlib import Path

import pytest

from index.hashing import ROOT_KEY
from index.radix import PrefixTree
from tests.factories import make_payload
from tiers.base import FLAG_MANIFEST, HEADER_BYTES, BlockMeta
from tiers.disk import DiskTier
from tiers.host import HostTier
from tiers.stack import TierStack

SIZE = 1024
SLOT = 4096


def make_chain(n: int, start: int = 0, size: int = SIZE) -> list[tuple[BlockMeta, bytes]]:
    out, parent = [], ROOT_KEY
    for i in range(start, start + n):
        payload = make_payload(size, seed=i)
        meta = BlockMeta.for_payload(7, i.to_bytes(4, "little") + b"s" * 12, parent, payload)
        out.append((meta, payload))
        parent = meta.key
    return out


async def make_stack(
    tmp_path: Path,
    host_slots: int = 4,
    disk_blocks: int | None = 16,
    redis_url: str | None = None,
    name: str = "a",
) -> TierStack:
    host = HostTier(str(tmp_path / f"arena-{name}"), host_slots * SLOT, SLOT)
    lower = []
    if disk_blocks is not None:
        lower.append(DiskTier(str(tmp_path / "disk"), disk_blocks * (SIZE + HEADER_BYTES)))
    if redis_url is not None:
        from tiers.redis import RedisTier

        lower.append(RedisTier(redis_url, 1 << 30))
    stack = TierStack(host, lower, PrefixTree())
    await stack.start()
    return stack


def keys_of(chain) -> list[bytes]:
    return [m.key for m, _ in chain]


async def test_store_writes_down_and_hits(tmp_path):
    stack = await make_stack(tmp_path)
    chain = make_chain(3)
    for meta, payload in chain:
        assert await stack.store(meta, payload)
    await stack.drain()
    stack.check_integrity()
    m = stack.tree.match(keys_of(chain))
    assert m.length == 3 and m.tiers == ["host"] * 3
    assert all(stack.tree.get(k).tiers == {"host", "disk"} for k in keys_of(chain))
    block = await stack.fetch(chain[1][0].key)
    assert bytes(block.payload) == chain[1][1]
    assert stack.counters.written_down == 3
    await stack.close()


async def test_host_eviction_keeps_disk_copy_and_promotes(tmp_path):
    stack = await make_stack(tmp_path, host_slots=4)
    chain = make_chain(10)
    for meta, payload in chain:
        assert await stack.store(meta, payload)
        await stack.drain()  # each block safe on disk before the next one needs room
    stack.check_integrity()
    assert stack.host.free_slots == 0 and stack.counters.evictions == 6
    m = stack.tree.match(keys_of(chain))
    assert m.length == 10
    assert m.tiers == ["disk"] * 6 + ["host"] * 4  # oldest blocks left host first
    block = await stack.fetch(chain[0][0].key)
    assert bytes(block.payload) == chain[0][1]
    assert stack.host.slot_of(chain[0][0].key) is not None  # promoted
    assert stack.counters.promotions == 1
    await stack.drain()
    stack.check_integrity()
    await stack.close()


async def test_host_only_leaf_copied_down_before_eviction(tmp_path):
    stack = await make_stack(tmp_path, host_slots=2)
    await stack._writedown.close()  # no background write-down: eviction itself must save it
    stack._writedown = None
    chain = make_chain(3)
    assert await stack.store(*chain[0])
    assert await stack.store(*make_chain(1, start=50)[0])
    assert await stack.store(*make_chain(1, start=80)[0])  # evicts the LRU leaf, copied down
    stack.check_integrity()
    assert stack.tree.get(chain[0][0].key).tiers == {"disk"}
    assert bytes((await stack.fetch(chain[0][0].key, promote=False)).payload) == chain[0][1]
    await stack.close()


async def test_no_lower_tier_drops_lru_leaf(tmp_path):
    stack = await make_stack(tmp_path, host_slots=2, disk_blocks=None)
    a, b, c = make_chain(1, 0)[0], make_chain(1, 1)[0], make_chain(1, 2)[0]
    for meta, payload in (a, b, c):
        assert await stack.store(meta, payload)
    stack.check_integrity()
    assert a[0].key not in stack.tree and b[0].key in stack.tree and c[0].key in stack.tree
    assert stack.counters.dropped == 1
    await stack.close()


async def test_pinned_blocks_are_not_evicted(tmp_path):
    stack = await make_stack(tmp_path, host_slots=2, disk_blocks=None)
    chain = make_chain(3)
    await stack.store(*chain[0])
    await stack.store(*chain[1])
    handles = stack.tree.pin(keys_of(chain[:2]))
    assert not await stack.store(*chain[2])  # nothing may go
    assert stack.tree.match(keys_of(chain)).length == 2
    stack.tree.unpin_nodes(handles)
    # Unpinned, only the block's own chain could make room: evicting its parent would leave
    # it unreachable, so the chain stays whole and the block is refused.
    assert not await stack.store(*chain[2])
    assert stack.tree.match(keys_of(chain)).length == 2
    stack.check_integrity()
    await stack.close()


async def test_corrupt_disk_block_is_a_miss(tmp_path):
    stack = await make_stack(tmp_path, host_slots=2)
    chain = make_chain(4)
    for meta, payload in chain:
        await stack.store(meta, payload)
        await stack.drain()
    victim = chain[0][0].key
    assert stack.tree.get(victim).tiers == {"disk"}
    path = stack.lower[0]._file(victim)
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 10)
        f.write(b"\xff\x00\xff")
    assert await stack.fetch(victim) is None
    assert stack.lower[0].errors.corrupt == 1 and stack.counters.failed_reads == 1
    assert stack.tree.get(victim) is None
    assert stack.tree.match(keys_of(chain)).length == 0  # the prefix starts with a hole
    assert not os.path.exists(path)
    await stack.drain()
    stack.check_integrity()
    await stack.close()


async def test_disk_full_evicts_disk_lru(tmp_path):
    stack = await make_stack(tmp_path, host_slots=8, disk_blocks=3)
    chain = make_chain(6)
    for meta, payload in chain:
        await stack.store(meta, payload)
        await stack.drain()
    stack.check_integrity()
    disk = stack.lower[0]
    assert disk.used_bytes <= disk.capacity_bytes
    assert stack.tree.blocks_in("disk") == 3 and stack.tree.blocks_in("host") == 6
    assert stack.tree.match(keys_of(chain)).length == 6  # host still holds everything
    await stack.close()


async def test_rebuild_after_restart_and_manifests(tmp_path):
    stack = await make_stack(tmp_path)
    chain = make_chain(5)
    for meta, payload in chain:
        await stack.store(meta, payload)
    man = BlockMeta.for_payload(7, b"m" * 16, ROOT_KEY, b"hello", FLAG_MANIFEST)
    assert await stack.put_manifest(man, b"hello") == 1
    await stack.close()

    again = await make_stack(tmp_path, name="b")
    manifests = await again.rebuild()
    assert [bytes(b.payload) for b in manifests] == [b"hello"]
    assert b"m" * 16 not in again.tree
    m = again.tree.match(keys_of(chain))
    assert m.length == 5 and m.tiers == ["disk"] * 5
    block = await again.fetch(chain[4][0].key)
    assert bytes(block.payload) == chain[4][1]
    await again.drain()
    again.check_integrity()
    await again.close()


@pytest.mark.redis
async def test_shared_redis_remote_hits(tmp_path, redis_server):
    writer = await make_stack(tmp_path / "w", disk_blocks=None, redis_url=redis_server)
    chain = make_chain(4)
    for meta, payload in chain:
        await writer.store(meta, payload)
    await writer.drain()
    assert writer.tree.get(chain[3][0].key).tiers == {"host", "redis"}
    await writer.close()

    reader = await make_stack(tmp_path / "r", redis_url=redis_server)
    keys = keys_of(chain)
    assert reader.tree.match(keys).length == 0
    assert await reader.remote.extend(keys, 0) == 4
    assert reader.tree.match(keys).tiers == ["redis"] * 4
    block = await reader.fetch(keys[2])
    assert bytes(block.payload) == chain[2][1]
    assert reader.host.slot_of(keys[2]) is not None
    # a key no index knows is still found in the shared tier by fetch
    other = make_chain(1, start=90)[0]
    await reader.lower[1].put(*other)
    assert bytes((await reader.fetch(other[0].key)).payload) == other[1]
    await reader.drain()
    reader.check_integrity()
    await reader.close()


async def test_internal_blocks_write_down_missed_are_copied_down_to_make_room(tmp_path):
    """Write-down lagging behind (here: off) must not wedge a full host: a host-only internal
    block is copied down and then evicted, instead of nothing being evictable."""
    stack = await make_stack(tmp_path, host_slots=4)
    await stack._writedown.close()
    stack._writedown = None
    chain = make_chain(4)
    for meta, payload in chain:
        assert await stack.store(meta, payload)
    handles = stack.tree.pin([chain[-1][0].key])  # the only leaf is being read
    (other,) = make_chain(1, start=100)
    assert await stack.store(*other)  # before: no candidate, the store failed
    assert stack.tree.get(chain[0][0].key).tiers == {"disk"}  # the oldest, copied then evicted
    assert stack.tree.match([m.key for m, _ in chain]).length == 4  # the chain is still whole
    stack.tree.unpin_nodes(handles)
    stack.check_integrity()
    await stack.close()
