"""Warm disk reads: verified straight from page-cache pages, zero copy; cold ones off-loop."""

from __future__ import annotations

import os

import pytest

from tests.factories import make_meta, make_payload
from tiers import pagecache
from tiers.base import HEADER_BYTES, CorruptBlock
from tiers.disk import DiskTier

pytestmark = pytest.mark.skipif(not pagecache.AVAILABLE, reason="needs RWF_NOWAIT and MAP_POPULATE")


def make_disk(tmp_path) -> DiskTier:
    return DiskTier(str(tmp_path / "disk"), 1 << 22)


def drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def test_warm_read_is_a_view_of_the_mapped_file(tmp_path):
    disk = make_disk(tmp_path)
    payload = make_payload(3 * 4096 + 5, seed=1)
    meta = make_meta(payload, 1)
    assert await disk.put(meta, payload)
    block = await disk.get(meta.key)
    assert block is not None and block.meta == meta and bytes(block.payload) == payload
    assert isinstance(block.payload, memoryview) and block.payload.readonly, "not the mapping"
    # files are replaced by rename, never rewritten: the verified view outlives its file
    assert await disk.delete(meta.key)
    assert not os.path.exists(disk._file(meta.key))
    assert bytes(block.payload) == payload
    disk.check_integrity()


async def test_cold_file_is_not_touched_on_the_loop_but_still_read(tmp_path):
    disk = make_disk(tmp_path)
    payload = make_payload(64 * 4096, seed=2)
    meta = make_meta(payload, 2)
    assert await disk.put(meta, payload)
    path, size = disk._file(meta.key), HEADER_BYTES + len(payload)
    drop_from_page_cache(path)
    try:
        pagecache.map_cached(path, size)
    except BlockingIOError:
        pass  # the loop path refuses: the worker-thread path reads it
    else:
        pytest.skip("this filesystem keeps the file cached despite POSIX_FADV_DONTNEED")
    block = await disk.get(meta.key)
    assert block is not None and bytes(block.payload) == payload
    disk.check_integrity()


async def test_map_cached_reports_damage_instead_of_returning_bytes(tmp_path):
    disk = make_disk(tmp_path)
    payload = make_payload(5000, seed=3)
    meta = make_meta(payload, 3)
    assert await disk.put(meta, payload)
    path, size = disk._file(meta.key), HEADER_BYTES + len(payload)
    assert pagecache.map_cached(str(tmp_path / "gone.blk"), size) is None
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 10)
        f.write(b"\x00\xff")
    assert isinstance(pagecache.map_cached(path, size), CorruptBlock)
    assert isinstance(pagecache.map_cached(path, size + 1), CorruptBlock), "size mismatch"
    assert await disk.get(meta.key) is None and not await disk.contains(meta.key)
    disk.check_integrity()
