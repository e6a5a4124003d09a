"""HostTier / ArenaView over a real mmapped file, with a real second process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from cacheservice.arena import ArenaView
from cacheservice.errors import BadRequest
from tests.factories import make_meta, make_payload
from tiers.base import HEADER_BYTES
from tiers.host import ArenaError, HostTier

SLOT = 8192
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def host(tmp_path):
    tier = HostTier(str(tmp_path / "arena"), 4 * SLOT, SLOT)
    yield tier
    await tier.close()


def test_layout(host: HostTier):
    assert host.num_slots == 4 and host.max_payload == SLOT - HEADER_BYTES
    assert host.arena_info() == {
        "path": host.path,
        "slot_bytes": SLOT,
        "num_slots": 4,
        "data_offset": 4096,
    }
    assert os.path.getsize(host.path) == 4096 + 4 * SLOT
    host.check_integrity()


async def test_round_trip_is_zero_copy(host: HostTier):
    payload = make_payload(3000, seed=1)
    meta = make_meta(payload, 1)
    assert await host.put(meta, payload)
    assert await host.put(meta, payload)  # idempotent: same key, no second slot
    assert host.free_slots == 3 and host.used_bytes == SLOT
    block = await host.get(meta.key)
    assert block is not None and block.meta == meta and bytes(block.payload) == payload
    slot = host.slot_of(meta.key)
    view = host.payload_view(slot)
    view[0] ^= 0xFF  # the returned payload aliases the slot: no copy was made
    assert block.payload[0] == payload[0] ^ 0xFF
    view[0] ^= 0xFF
    assert host.meta_of(meta.key) == meta and await host.contains(meta.key)
    assert [m async for m in host.scan()] == [meta]
    assert await host.delete(meta.key) and not await host.delete(meta.key)
    assert await host.get(meta.key) is None and host.free_slots == 4
    host.check_integrity()


async def test_full_arena_refuses(host: HostTier):
    metas = []
    for i in range(5):
        payload = make_payload(100, seed=i)
        metas.append(make_meta(payload, i))
        assert await host.put(metas[-1], payload) == (i < 4)
    assert host.free_slots == 0 and host.used_bytes == host.capacity_bytes
    assert host.alloc() is None
    host.check_integrity()


async def test_oversized_block_is_refused_and_bad_geometry_a_typed_error(host, tmp_path):
    payload = make_payload(SLOT, seed=2)
    assert await host.put(make_meta(payload), payload) is False  # a miss, never an error
    with pytest.raises(ArenaError, match="multiple of 4096"):
        HostTier(str(tmp_path / "bad"), 10 * SLOT, 5000)
    with pytest.raises(ArenaError, match="capacity"):
        HostTier(str(tmp_path / "bad"), 100, SLOT)
    host.check_integrity()


async def test_reserved_slots_are_invisible_until_published(host: HostTier):
    payload = make_payload(500, seed=3)
    meta = make_meta(payload, 3)
    slot = host.alloc()
    other = host.alloc()
    assert slot is not None and other is not None and host.free_slots == 2
    host.payload_view(slot, len(payload))[:] = payload
    assert not await host.contains(meta.key) and await host.get(meta.key) is None
    assert [m async for m in host.scan()] == []
    host.check_integrity()
    host.publish(slot, meta)
    host.free(other)
    assert host.slot_of(meta.key) == slot and host.free_slots == 3
    block = await host.get(meta.key)
    assert block is not None and bytes(block.payload) == payload
    dup = host.alloc()
    host.publish(dup, meta)  # a second writer of the same block: its slot goes back
    assert host.slot_of(meta.key) == slot and host.free_slots == 3
    host.check_integrity()


@pytest.mark.parametrize("where", ["payload", "header"])
async def test_corrupt_slot_is_a_miss_and_freed(host: HostTier, where: str):
    payload = make_payload(2000, seed=4)
    meta = make_meta(payload, 4)
    await host.put(meta, payload)
    slot = host.slot_of(meta.key)
    offset = host.data_offset + slot * SLOT + (HEADER_BYTES + 10 if where == "payload" else 9)
    with open(host.path, "r+b") as f:  # corrupt it from outside, as a buggy client would
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert await host.get(meta.key) is None
    assert host.slot_of(meta.key) is None and host.free_slots == 4
    host.check_integrity()


CHILD = """
import sys, xxhash
from cacheservice.arena import ArenaView
path, read_slot, read_len, write_slot = sys.argv[1], *map(int, sys.argv[2:5])
with ArenaView.open(path) as view:
    print(xxhash.xxh3_64_intdigest(view.payload(read_slot, read_len)))
    src = bytes(range(256)) * 12
    view.payload(write_slot, len(src))[:] = src
"""


async def test_second_process_reads_and_writes_the_arena(host: HostTier):
    payload = make_payload(3072, seed=5)
    meta = make_meta(payload, 5)
    await host.put(meta, payload)
    slot = host.alloc()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, host.path, str(host.slot_of(meta.key)), "3072", str(slot)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert int(out.stdout) == xxhash.xxh3_64_intdigest(payload)  # read what the service wrote
    written = bytes(range(256)) * 12
    assert bytes(host.payload_view(slot, len(written))) == written
    meta2 = make_meta(written, 6)
    assert meta2.checksum == xxhash.xxh3_64_intdigest(host.payload_view(slot, len(written)))
    host.publish(slot, meta2)
    block = await host.get(meta2.key)
    assert block is not None and bytes(block.payload) == written
    host.check_integrity()


async def test_view_never_unlinks_and_owner_does(tmp_path):
    tier = HostTier(str(tmp_path / "arena"), 2 * SLOT, SLOT)
    view = ArenaView.open(tier.path)
    assert (view.slot_bytes, view.num_slots, view.data_offset) == (SLOT, 2, 4096)
    with pytest.raises(BadRequest, match="slot"):
        view.payload(2)
    held = view.payload(0, 8)  # an outstanding view must not make close() fail
    view.close()
    assert os.path.exists(tier.path) and len(held) == 8
    payload = make_payload(10)
    await tier.put(make_meta(payload), payload)
    block = await tier.get(make_meta(payload).key)
    await tier.close()
    await tier.close()
    assert not os.path.exists(tier.path) and bytes(block.payload) == payload


def test_open_rejects_a_foreign_file(tmp_path):
    bogus = tmp_path / "notarena"
    bogus.write_bytes(b"\0" * 8192)
    with pytest.raises(BadRequest, match="not a version"):
        ArenaView.open(str(bogus))
    with pytest.raises(BadRequest, match="no arena"):
        ArenaView.open(str(tmp_path / "missing"))
