"""Local disk tier: one file per block (64-byte header + payload), survives restarts.

Layout: ``<root>/<first two hex digits of the key>/<key hex>.blk``; 256 fan-out directories
keep directory sizes small. A block is written to a unique temp name in its directory and
renamed over the final name, so a reader sees the whole block or nothing. No fsync: the tier
must survive a service restart, not a power loss; a torn file after a crash is caught by the
checksum and becomes a miss.

The in-memory map ``key -> file size`` is the tier's truth for accounting; the constructor
rebuilds it by listing the directory, ``scan`` reads each header so the index can be rebuilt.
Blocking I/O runs in worker threads; accounting only changes on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Sequence

import numpy as np

from tiers import pagecache
from tiers.base import HEADER_BYTES, Block, BlockMeta, CorruptBlock, Tier

SUFFIX = ".blk"
TMP_SUFFIX = ".tmp"
_SCAN_BATCH = 256
# Blocks of at most this many bytes first try the page cache on the event loop, one at a time
# with a yield between them (never a device wait: a mapped, mincore-proven file for a plain
# read, RWF_NOWAIT for a read into the caller's buffer): a worker-thread hop costs about half
# as much as the read itself. Blocks not in the page cache, and larger ones, go to a worker
# thread together.
_INLINE_BYTES = 4 << 20
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_tmp_ids = itertools.count()


def _write_file(path: str, header: bytes, payload: bytes | memoryview) -> bool:
    tmp = f"{path}.{os.getpid()}.{next(_tmp_ids)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            bufs = [memoryview(header), memoryview(payload).cast("B")]
            while bufs:
                n = os.writev(fd, bufs)
                while bufs and n >= len(bufs[0]):
                    n -= len(bufs[0])
                    bufs.pop(0)
                if bufs:
                    bufs[0] = bufs[0][n:]
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def _read_file(
    path: str, size: int, out: memoryview | None = None, flags: int = 0
) -> Block | None | CorruptBlock:
    """Read the ``size``-byte file at ``path`` and verify it: the block, None when the file is
    gone, or the CorruptBlock it failed with. The payload lands in ``out`` (exactly
    ``size - HEADER_BYTES`` bytes) when given, else in a fresh buffer the caller then owns.
    With ``flags=os.RWF_NOWAIT`` raises BlockingIOError instead of waiting for the device."""
    fd = pagecache.open_block_file(path)
    if not isinstance(fd, int):
        return fd
    if out is None:
        # np.empty: no zero fill of bytes about to be overwritten
        whole = memoryview(np.empty(size, dtype=np.uint8))
        header, payload = whole[:HEADER_BYTES], whole[HEADER_BYTES:]
    else:
        assert len(out) == size - HEADER_BYTES, "out must be exactly the payload length"
        header, payload = memoryview(bytearray(HEADER_BYTES)), out
    # one read fills header and payload; the spare byte detects a file longer than recorded
    bufs = [header, payload, memoryview(bytearray(1))]
    got = 0
    try:
        while bufs and got <= size:
            n = os.preadv(fd, bufs, got, flags)
            if n == 0:
                break
            got += n
            while bufs and n >= len(bufs[0]):
                n -= len(bufs.pop(0))
            if bufs:
                bufs[0] = bufs[0][n:]
    except BlockingIOError:
        raise
    except OSError as e:
        return CorruptBlock(f"cannot read {path}: {e}")
    finally:
        os.close(fd)
    if got != size:
        return CorruptBlock(f"{path}: {got} bytes on disk, {size} expected")
    try:
        meta = BlockMeta.decode(header)
        meta.verify(payload)
    except CorruptBlock as e:
        return e
    return Block(meta, payload)


def _read_cached(path: str, size: int, out: memoryview | None) -> Block | None | CorruptBlock:
    """Like ``_read_file``, but only from the page cache (never waits on the device): a block
    that is not fully cached raises BlockingIOError, to be read off-loop. Without ``out`` the
    payload is a zero-copy view of the cached pages."""
    if out is None and pagecache.AVAILABLE:
        return pagecache.map_cached(path, size)
    return _read_file(path, size, out, _NOWAIT)


def _read_header(path: str) -> BlockMeta | None:
    """The header when it is valid and the file size matches it, else None."""
    try:
        with open(path, "rb") as f:
            meta = BlockMeta.decode(f.read(HEADER_BYTES))
            if os.fstat(f.fileno()).st_size != HEADER_BYTES + meta.length:
                return None
            return meta
    except (OSError, CorruptBlock):
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class DiskTier(Tier):
    name = "disk"

    def __init__(self, path: str, capacity_bytes: int) -> None:
        self.path = path
        self._capacity = capacity_bytes
        self._sizes: dict[bytes, int] = {}
        self._pending: dict[bytes, int] = {}  # being written: counted, not yet readable
        self._used = 0
        for i in range(256):
            os.makedirs(os.path.join(path, f"{i:02x}"), exist_ok=True)
        for i in range(256):
            with os.scandir(os.path.join(path, f"{i:02x}")) as it:
                for entry in it:
                    self._adopt(entry)

    def _adopt(self, entry: os.DirEntry) -> None:
        name = entry.name
        if name.endswith(TMP_SUFFIX):  # left by a crash mid-write
            _unlink(entry.path)
            return
        if not name.endswith(SUFFIX):
            return
        try:
            key = bytes.fromhex(name[: -len(SUFFIX)])
            size = entry.stat().st_size
        except (ValueError, OSError):
            return
        if len(key) == 16:
            self._sizes[key] = size
            self._used += size

    def _file(self, key: bytes) -> str:
        h = key.hex()
        return os.path.join(self.path, h[:2], h + SUFFIX)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def _claim(self, meta: BlockMeta) -> bool:
        """Reserve space for a write on the loop thread; False when full or already stored."""
        size = HEADER_BYTES + meta.length
        if self._used + size > self._capacity:
            return False
        self._pending[meta.key] = size
        self._used += size
        return True

    def _settle(self, key: bytes, ok: bool) -> None:
        size = self._pending.pop(key)
        if ok:
            self._sizes[key] = size
        else:
            self._used -= size

    async def put(self, meta: BlockMeta, payload: bytes | memoryview) -> bool:
        return (await self.put_many([(meta, payload)]))[0]

    async def put_many(self, items: Sequence[tuple[BlockMeta, bytes | memoryview]]) -> list[bool]:
        results: list[bool] = []
        jobs: list[tuple[BlockMeta, bytes | memoryview]] = []
        for meta, payload in items:
            assert meta.length == len(payload), "meta.length must equal the payload length"
            if meta.key in self._sizes or meta.key in self._pending:
                results.append(True)
            elif self._claim(meta):
                jobs.append((meta, payload))
                results.append(True)
            else:
                results.append(False)
        if not jobs:
            return results

        def write_all() -> list[bool]:
            return [_write_file(self._file(m.key), m.encode(), p) for m, p in jobs]

        try:
            written = await asyncio.to_thread(write_all)
        except BaseException:
            for meta, _ in jobs:
                self._settle(meta.key, False)
            raise
        outcome = {meta.key: ok for (meta, _), ok in zip(jobs, written, strict=True)}
        for meta, ok in outcome.items():
            self._settle(meta, ok)
        return [
            ok and outcome.get(meta.key, True) for (meta, _), ok in zip(items, results, strict=True)
        ]

    async def get(self, key: bytes) -> Block | None:
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[bytes]) -> list[Block | None]:
        todo = [(self._file(k), self._sizes[k], None) for k in keys if k in self._sizes]
        found = await self._read(todo)
        blocks: dict[bytes, Block] = {}
        for key, got in zip((k for k in keys if k in self._sizes), found, strict=True):
            if await self._settle_read(key, got):
                blocks[key] = got
        return [blocks.get(k) for k in keys]

    async def get_into(self, key: bytes, out: memoryview) -> BlockMeta | None:
        size = self._sizes.get(key)
        if size is None or size - HEADER_BYTES > len(out):
            return None
        (got,) = await self._read([(self._file(key), size, out[: size - HEADER_BYTES])])
        return got.meta if await self._settle_read(key, got) else None

    async def _read(
        self, todo: list[tuple[str, int, memoryview | None]]
    ) -> list[Block | None | CorruptBlock]:
        if not todo:
            return []
        found: list = [BlockingIOError()] * len(todo)
        for i, (path, size, out) in enumerate(todo):
            if size > _INLINE_BYTES or not (pagecache.AVAILABLE if out is None else _NOWAIT):
                continue
            if i:
                await asyncio.sleep(0)  # bound how long the loop is held: one block
            try:
                found[i] = _read_cached(path, size, out)
            except BlockingIOError as e:
                found[i] = e
        cold = [i for i, got in enumerate(found) if isinstance(got, BlockingIOError)]
        if cold:
            again = await asyncio.to_thread(lambda: [_read_file(*todo[i]) for i in cold])
            for i, got in zip(cold, again, strict=True):
                found[i] = got
        return found

    async def _settle_read(self, key: bytes, got: Block | None | CorruptBlock) -> bool:
        """True when ``got`` is the verified block ``key``; a gone or corrupt one is forgotten
        (and its file removed) so it is never hit again."""
        if isinstance(got, Block) and got.meta.key == key:
            return True
        if key in self._sizes:
            await self.delete(key)
        return False

    async def contains(self, key: bytes) -> bool:
        return key in self._sizes

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return [k in self._sizes for k in keys]

    async def delete(self, key: bytes) -> bool:
        size = self._sizes.pop(key, None)
        if size is None:
            return False
        self._used -= size
        await asyncio.to_thread(_unlink, self._file(key))
        return True

    async def scan(self) -> AsyncIterator[BlockMeta]:
        keys = list(self._sizes)
        for i in range(0, len(keys), _SCAN_BATCH):
            batch = keys[i : i + _SCAN_BATCH]
            metas = await asyncio.to_thread(
                lambda b=batch: [_read_header(self._file(k)) for k in b]
            )
            for key, meta in zip(batch, metas, strict=True):
                if meta is not None and meta.key == key and key in self._sizes:
                    yield meta
                elif key in self._sizes:
                    await self.delete(key)

    def check_integrity(self) -> None:
        assert not self._pending, "check_integrity while writes are in flight"
        assert self._used == sum(self._sizes.values()), "used_bytes drifted from the file map"
        on_disk: dict[bytes, int] = {}
        for i in range(256):
            with os.scandir(os.path.join(self.path, f"{i:02x}")) as it:
                for entry in it:
                    if entry.name.endswith(SUFFIX):
                        key = bytes.fromhex(entry.name[: -len(SUFFIX)])
                        on_disk[key] = entry.stat().st_size
        assert on_disk == self._sizes, "files on disk and the in-memory map disagree"
