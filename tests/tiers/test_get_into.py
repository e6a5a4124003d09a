"""Tier.get_into: reads straight into a caller's buffer (a host slot) and verifies it there."""

from __future__ import annotations

import os

import numpy as np
import pytest

import tiers.disk
from tests.factories import DAMAGES, damage_file, make_meta, make_payload
from tests.tiers.test_stack import keys_of, make_chain, make_stack
from tiers.base import HEADER_BYTES
from tiers.disk import DiskTier
from tiers.redis import RedisTier


def make_out(size: int) -> memoryview:
    return memoryview(np.full(size, 0xAA, dtype=np.uint8))


@pytest.fixture(params=["page cache", "worker thread"])
async def disk(request, tmp_path, monkeypatch) -> DiskTier:
    if request.param == "worker thread":  # the path of blocks not in the page cache
        monkeypatch.setattr(tiers.disk, "_INLINE_BYTES", 0)
    return DiskTier(str(tmp_path / "disk"), 1 << 20)


async def test_disk_round_trip_into_larger_buffer(disk: DiskTier):
    payload = make_payload(5000, seed=1)
    meta = make_meta(payload, 1)
    await disk.put(meta, payload)
    out = make_out(8192)
    assert await disk.get_into(meta.key, out) == meta
    assert bytes(out[:5000]) == payload and bytes(out[5000:]) == b"\xaa" * 3192  # tail untouched
    assert await disk.get_into(b"\1" * 16, out) is None
    too_small = make_out(4999)
    assert await disk.get_into(meta.key, too_small) is None
    assert await disk.contains(meta.key), "a block too large for the buffer is not corrupt"
    disk.check_integrity()


@pytest.mark.parametrize("damage", DAMAGES)
async def test_disk_damaged_file_is_a_miss_and_deleted(disk: DiskTier, damage: str):
    payload = make_payload(3000, seed=2)
    meta = make_meta(payload, 2)
    await disk.put(meta, payload)
    path = disk._file(meta.key)
    damage_file(path, damage, cut=1000)  # a short file
    assert await disk.get_into(meta.key, make_out(4096)) is None
    assert not os.path.exists(path) and not await disk.contains(meta.key)
    assert disk.used_bytes == 0
    disk.check_integrity()


async def test_disk_cold_read_after_dropping_page_cache(tmp_path):
    disk = DiskTier(str(tmp_path / "disk"), 1 << 20)
    payload = make_payload(64 << 10, seed=3)
    meta = make_meta(payload, 3)
    await disk.put(meta, payload)
    os.sync()
    fd = os.open(disk._file(meta.key), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    out = make_out(64 << 10)
    assert await disk.get_into(meta.key, out) == meta and bytes(out) == payload


async def test_default_get_into_copies_and_misses(redis_server: str):
    tier = RedisTier(redis_server, 1 << 20, prefix="gi:")  # uses Tier's get + copy default
    try:
        payload = make_payload(2048, seed=4)
        meta = make_meta(payload, 4)
        assert await tier.put(meta, payload)
        out = make_out(4096)
        assert await tier.get_into(meta.key, out) == meta and bytes(out[:2048]) == payload
        assert await tier.get_into(meta.key, make_out(100)) is None
        assert await tier.contains(meta.key)
        await tier._client.setrange(tier._rkey(meta.key), HEADER_BYTES + 5, b"\0\1")
        assert await tier.get_into(meta.key, out) is None
        assert not await tier.contains(meta.key)  # corrupt: deleted
        tier.check_integrity()
    finally:
        await tier.close()


async def test_promotion_reads_into_slot_and_corrupt_publishes_nothing(tmp_path):
    stack = await make_stack(tmp_path, host_slots=2)
    chain = make_chain(4)
    for meta, payload in chain:
        await stack.store(meta, payload)
        await stack.drain()
    good, bad = chain[0][0].key, chain[1][0].key
    assert stack.tree.get(good).tiers == {"disk"} and stack.tree.get(bad).tiers == {"disk"}
    block = await stack.fetch(good)
    assert bytes(block.payload) == chain[0][1] and stack.host.slot_of(good) is not None
    assert stack.counters.promotions == 1
    with open(stack.lower[0]._file(bad), "r+b") as f:
        f.seek(HEADER_BYTES + 10)
        f.write(b"\xff\x00\xff")
    free_before = stack.host.free_slots
    assert await stack.fetch(bad) is None
    assert stack.host.slot_of(bad) is None and stack.tree.get(bad) is None
    assert stack.host.free_slots >= free_before and stack.counters.promotions == 1
    assert stack.tree.match(keys_of(chain)).length == 1
    await stack.drain()
    stack.check_integrity()
    await stack.close()
