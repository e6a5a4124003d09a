"""Local disk tier: one file per block (64-byte header + payload), survives restarts.

Layout: ``<root>/<first two hex digits of the key>/<key hex>.blk``; 256 fan-out directories
keep directory sizes small. A block is written to a unique temp name in its directory and
renamed over the final name, so a reader sees the whole block or nothing (tiers/blockfile.py).
KV blocks are not fsynced: the tier survives a crash of the service (the page cache keeps
renamed files), not a power loss, after which a torn file is caught by the checksum and
becomes a miss. Manifests (namespaces, chunks) are fsynced before their put returns.
Files are 0600 in 0700 directories: KV is as private as the prompts it encodes.

Only bytes that fail their header/length/checksum check are deleted. A medium that fails
(EMFILE, EIO, a filesystem without RWF_NOWAIT, ENOSPC) costs a miss or a refused put and is
counted in ``errors``; the block stays. ``capacity_bytes`` is the configured budget or what
the filesystem can still take, whichever is smaller.

The in-memory map ``key -> file size`` is the tier's truth for accounting; the constructor
rebuilds it by listing the directory, ``scan`` reads each header so the index can be rebuilt.
Blocking I/O runs in worker threads; accounting only changes on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import AsyncIterator, Sequence

from tiers import pagecache
from tiers.base import FLAG_MANIFEST, HEADER_BYTES, Block, BlockMeta, CorruptBlock, Tier
from tiers.blockfile import (
    DIR_MODE,
    SUFFIX,
    TMP_SUFFIX,
    ReadOutcome,
    read_cached,
    read_file,
    read_header,
    unlink,
    write_file,
)

log = logging.getLogger("cacheservice.disk")
_SCAN_BATCH = 256
# Blocks of at most this many bytes first try the page cache on the event loop, one at a time
# with a yield between them (never a device wait: a mapped, probed file for a plain read,
# RWF_NOWAIT for a read into the caller's buffer): a worker-thread hop costs about half as
# much as the read itself. Blocks not in the page cache, and larger ones, go to a worker
# thread together.
_INLINE_BYTES = 4 << 20
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
# errnos that say "this filesystem cannot do a non-blocking read" (tmpfs, overlayfs, NFS):
# the read is retried plainly and the tier stops asking.
_NO_NOWAIT = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


class DiskTier(Tier):
    name = "disk"

    def __init__(self, path: str, capacity_bytes: int) -> None:
        super().__init__()
        self.path = path
        self._capacity = capacity_bytes
        self._sizes: dict[bytes, int] = {}
        # Writes in flight: counted in used bytes, not yet readable. A second put of the same
        # block awaits the first one's outcome instead of claiming a copy that may never land.
        self._pending: dict[bytes, tuple[int, asyncio.Future[bool]]] = {}
        self._used = 0
        self._nowait = _NOWAIT
        self._full_logged = False
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)
        os.chmod(path, DIR_MODE)
        for i in range(256):
            sub = os.path.join(path, f"{i:02x}")
            os.makedirs(sub, mode=DIR_MODE, exist_ok=True)
            os.chmod(sub, DIR_MODE)
            with os.scandir(sub) as it:
                for entry in it:
                    self._adopt(entry)

    def _adopt(self, entry: os.DirEntry) -> None:
        name = entry.name
        if name.endswith(TMP_SUFFIX):  # left by a crash mid-write
            unlink(entry.path)
            self.errors.scan_removed += 1
            return
        if not name.endswith(SUFFIX):
            return
        try:
            key = bytes.fromhex(name[: -len(SUFFIX)])
            size = entry.stat(follow_symlinks=False).st_size
        except (ValueError, OSError):
            return
        if len(key) == 16 and entry.is_file(follow_symlinks=False):
            self._sizes[key] = size
            self._used += size

    def _file(self, key: bytes) -> str:
        h = key.hex()
        return os.path.join(self.path, h[:2], h + SUFFIX)

    @property
    def capacity_bytes(self) -> int:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return self._capacity
        return min(self._capacity, self._used + st.f_bavail * st.f_frsize)

    @property
    def used_bytes(self) -> int:
        return self._used

    def _claim(self, meta: BlockMeta) -> asyncio.Future[bool] | None:
        """Reserve space for a write on the loop thread; None when over budget."""
        size = HEADER_BYTES + meta.length
        if self._used + size > self._capacity:
            return None
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[meta.key] = (size, done)
        self._used += size
        return done

    def _settle(self, key: bytes, error: OSError | None) -> None:
        size, done = self._pending.pop(key)
        if error is None:
            self._sizes[key] = size
        else:
            self._used -= size
            self._count_write_error(error)
        done.set_result(error is None)

    def _count_write_error(self, error: OSError) -> None:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            self.errors.no_space += 1
            if not self._full_logged:
                self._full_logged = True
                log.warning("disk tier %s is full (%s): refusing writes", self.path, error)
        else:
            self.errors.io_error += 1
            log.warning("disk tier write failed: %s", error)

    async def put(self, meta: BlockMeta, payload: bytes | memoryview) -> bool:
        return (await self.put_many([(meta, payload)]))[0]

    async def put_many(self, items: Sequence[tuple[BlockMeta, bytes | memoryview]]) -> list[bool]:
        """True for each block that is on disk when this returns (written now or before)."""
        results: list[bool | asyncio.Future[bool]] = []
        jobs: list[tuple[BlockMeta, bytes | memoryview]] = []
        for meta, payload in items:
            assert meta.length == len(payload), "meta.length must equal the payload length"
            if meta.key in self._sizes:
                results.append(True)
            elif meta.key in self._pending:
                results.append(self._pending[meta.key][1])
            elif (done := self._claim(meta)) is not None:
                jobs.append((meta, payload))
                results.append(done)
            else:
                results.append(False)
        if jobs:

            def write_all() -> list[OSError | None]:
                return [
                    write_file(self._file(m.key), m.encode(), p, bool(m.flags & FLAG_MANIFEST))
                    for m, p in jobs
                ]

            try:
                errors = await asyncio.to_thread(write_all)
            except BaseException:
                for meta, _ in jobs:
                    self._settle(meta.key, OSError(errno.ECANCELED, "write cancelled"))
                raise
            for (meta, _), error in zip(jobs, errors, strict=True):
                self._settle(meta.key, error)
        return [r if isinstance(r, bool) else await r for r in results]

    async def get(self, key: bytes) -> Block | None:
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[bytes]) -> list[Block | None]:
        known = [k for k in keys if k in self._sizes]
        found = await self._read([(self._file(k), self._sizes[k], None) for k in known])
        blocks: dict[bytes, Block] = {}
        for key, got in zip(known, found, strict=True):
            if await self._settle_read(key, got):
                blocks[key] = got
        return [blocks.get(k) for k in keys]

    async def get_into(self, key: bytes, out: memoryview) -> BlockMeta | None:
        size = self._sizes.get(key)
        if size is None or size - HEADER_BYTES > len(out):
            return None
        (got,) = await self._read([(self._file(key), size, out[: size - HEADER_BYTES])])
        return got.meta if await self._settle_read(key, got) else None

    def _inline(self, size: int, out: memoryview | None) -> bool:
        if size > _INLINE_BYTES or not self._nowait:
            return False
        return out is not None or pagecache.AVAILABLE

    async def _read(self, todo: list[tuple[str, int, memoryview | None]]) -> list[ReadOutcome]:
        if not todo:
            return []
        found: list = [BlockingIOError()] * len(todo)
        for i, (path, size, out) in enumerate(todo):
            if not self._inline(size, out):
                continue
            if i:
                await asyncio.sleep(0)  # bound how long the loop is held: one block
            try:
                got = read_cached(path, size, out, self._nowait)
            except BlockingIOError as e:
                got = e
            if isinstance(got, OSError) and got.errno in _NO_NOWAIT:
                log.info("%s cannot read without blocking (%s): reading off-loop", self.path, got)
                self._nowait = 0
                got = BlockingIOError()
            found[i] = got
        cold = [i for i, got in enumerate(found) if isinstance(got, BlockingIOError)]
        if cold:
            again = await asyncio.to_thread(lambda: [read_file(*todo[i]) for i in cold])
            for i, got in zip(cold, again, strict=True):
                found[i] = got
        return found

    async def _settle_read(self, key: bytes, got: ReadOutcome) -> bool:
        """True when ``got`` is the verified block ``key``. Bytes that lie are deleted; a file
        that is gone is forgotten; a failed read keeps the block (a miss this time)."""
        if isinstance(got, Block):
            if got.meta.key == key:
                return True
            got = CorruptBlock(f"file of {key.hex()} holds block {got.meta.key.hex()}")
        if isinstance(got, CorruptBlock):
            self.errors.corrupt += 1
            log.warning("disk block removed: %s", got)
            await self.delete(key)
        elif isinstance(got, OSError):
            self.errors.io_error += 1
        elif key in self._sizes:  # the file is gone
            self._used -= self._sizes.pop(key)
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
        await asyncio.to_thread(unlink, self._file(key))
        return True

    async def scan(self) -> AsyncIterator[BlockMeta]:
        keys = list(self._sizes)
        for i in range(0, len(keys), _SCAN_BATCH):
            batch = keys[i : i + _SCAN_BATCH]
            metas = await asyncio.to_thread(lambda b=batch: [read_header(self._file(k)) for k in b])
            for key, meta in zip(batch, metas, strict=True):
                if key not in self._sizes:
                    continue
                if isinstance(meta, BlockMeta) and meta.key == key:
                    yield meta
                elif isinstance(meta, OSError):
                    self.errors.io_error += 1  # unreadable now: kept, but not indexed
                elif meta is None:
                    self._used -= self._sizes.pop(key)
                else:
                    self.errors.scan_removed += 1
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
