"""DiskTier on real files in tmp_path."""

from __future__ import annotations

import os

import pytest

from tests.factories import DAMAGES, damage_file, make_block_chain, make_meta, make_payload
from tiers.base import HEADER_BYTES, Block, CorruptBlock
from tiers.blockfile import READ_TILE, read_file, write_file
from tiers.disk import DiskTier


@pytest.fixture
def disk(tmp_path) -> DiskTier:
    return DiskTier(str(tmp_path / "disk"), 1 << 20)


def files(root: str) -> list[str]:
    return sorted(name for _, _, names in os.walk(root) for name in names)


async def test_round_trip(disk: DiskTier):
    blocks = make_block_chain(3, 5000)
    assert await disk.put_many([(b.meta, b.payload) for b in blocks]) == [True] * 3
    assert await disk.put(blocks[0].meta, blocks[0].payload)  # already stored
    assert disk.used_bytes == 3 * (HEADER_BYTES + 5000)
    assert files(disk.path) == sorted(b.meta.key.hex() + ".blk" for b in blocks)  # no temps
    got = await disk.get_many([b.meta.key for b in blocks] + [b"\1" * 16])
    assert [bytes(g.payload) for g in got[:3]] == [b.payload for b in blocks] and got[3] is None
    assert got[1].meta == blocks[1].meta
    assert await disk.contains_many([blocks[0].meta.key, b"\1" * 16]) == [True, False]
    assert await disk.delete(blocks[0].meta.key) and not await disk.delete(blocks[0].meta.key)
    assert await disk.get(blocks[0].meta.key) is None and not await disk.contains(
        blocks[0].meta.key
    )
    assert disk.used_bytes == 2 * (HEADER_BYTES + 5000)
    disk.check_integrity()


async def test_full_disk_refuses(tmp_path):
    disk = DiskTier(str(tmp_path / "d"), 2 * (HEADER_BYTES + 1000) + 10)
    blocks = make_block_chain(3, 1000)
    assert await disk.put_many([(b.meta, b.payload) for b in blocks]) == [True, True, False]
    assert len(files(disk.path)) == 2 and disk.used_bytes <= disk.capacity_bytes
    assert await disk.get(blocks[2].meta.key) is None
    disk.check_integrity()


@pytest.mark.parametrize("damage", DAMAGES)
async def test_damaged_file_is_a_miss_and_deleted(disk: DiskTier, damage: str):
    payload = make_payload(3000, seed=9)
    meta = make_meta(payload, 9)
    await disk.put(meta, payload)
    path = disk._file(meta.key)
    damage_file(path, damage)
    assert await disk.get(meta.key) is None
    assert not os.path.exists(path) and disk.used_bytes == 0
    assert not await disk.contains(meta.key)
    disk.check_integrity()


async def test_restart_rebuilds_from_files(tmp_path):
    root = str(tmp_path / "disk")
    first = DiskTier(root, 1 << 20)
    blocks = make_block_chain(4, 2000)
    await first.put_many([(b.meta, b.payload) for b in blocks])
    await first.close()
    bad = blocks[3].meta.key.hex()
    with open(os.path.join(root, bad[:2], bad + ".blk"), "r+b") as f:
        f.write(b"JUNK")  # torn header: scan must drop it
    stale = os.path.join(root, "00", "leftover.blk.1.2.tmp")
    open(stale, "wb").write(b"half a block")

    again = DiskTier(root, 1 << 20)
    assert not os.path.exists(stale) and again.used_bytes == 4 * (HEADER_BYTES + 2000)
    metas = [m async for m in again.scan()]
    assert sorted(m.key for m in metas) == sorted(b.meta.key for b in blocks[:3])
    assert {m.key: m for m in metas}[blocks[1].meta.key] == blocks[1].meta
    assert again.used_bytes == 3 * (HEADER_BYTES + 2000)
    block = await again.get(blocks[2].meta.key)
    assert block is not None and bytes(block.payload) == blocks[2].payload
    again.check_integrity()


async def test_memoryview_payload_and_write_failure(tmp_path):
    disk = DiskTier(str(tmp_path / "disk"), 1 << 20)
    payload = make_payload(4096, seed=3)
    meta = make_meta(payload, 3)
    assert await disk.put(meta, memoryview(payload))
    assert bytes((await disk.get(meta.key)).payload) == payload
    other = make_meta(payload, 4)  # lands in another fan-out directory than `meta`
    fanout = os.path.dirname(disk._file(other.key))
    os.rmdir(fanout)
    open(fanout, "wb").close()  # a file where the directory should be: every write fails
    assert not await disk.put(other, payload)  # the medium failed: False, space given back
    assert disk.used_bytes == HEADER_BYTES + 4096 and not await disk.contains(other.key)
    os.unlink(fanout)
    os.mkdir(fanout)
    disk.check_integrity()


@pytest.mark.parametrize("at", [None, 0, READ_TILE - 1, READ_TILE, 2 * READ_TILE + 99])
def test_a_block_of_several_tiles_is_verified_in_every_tile(tmp_path, at):
    """Reads hash each tile as it lands: a flipped byte in any tile (the first, either side
    of a tile edge, the last) is a CorruptBlock, read into a slot or into a fresh buffer."""
    payload = make_payload(2 * READ_TILE + 100, seed=3)
    meta = make_meta(payload, 3)
    path = str(tmp_path / "b.blk")
    assert write_file(path, meta.encode(), payload) is None
    size = HEADER_BYTES + meta.length
    if at is not None:
        with open(path, "r+b") as f:
            f.seek(HEADER_BYTES + at)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))
    slot = memoryview(bytearray(meta.length))
    for out in (slot, None):
        got = read_file(path, size, out)
        if at is None:
            assert isinstance(got, Block) and bytes(got.payload) == payload
        else:
            assert isinstance(got, CorruptBlock), f"flip at {at} not caught"
    assert isinstance(read_file(path, size + 1), CorruptBlock), "size on record must match"
