"""One block per file: the disk tier's file I/O, run in worker threads or (page-cache hits)
on the loop.

A file is ``64-byte header + payload``, written to a unique temp name and renamed over the
final name, so a reader sees the whole block or nothing. Every outcome is one of: a verified
``Block``; ``None`` (the file is gone: a plain miss); ``CorruptBlock`` (the bytes lie: the
only outcome that may delete the file); ``OSError`` (the medium failed: EMFILE, EIO,
EOPNOTSUPP, ENOSPC — the block itself may be fine and must be kept).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import xxhash

from tiers import pagecache
from tiers.base import HEADER_BYTES, Block, BlockMeta, CorruptBlock
from tiers.iovec import advance

SUFFIX = ".blk"
TMP_SUFFIX = ".tmp"
FILE_MODE = 0o600
DIR_MODE = 0o700
_tmp_ids = itertools.count()

ReadOutcome = Block | None | CorruptBlock | OSError


def write_file(
    path: str, header: bytes, payload: bytes | memoryview, durable: bool = False
) -> OSError | None:
    """Write one block atomically (temp file + rename); None on success, else the OSError
    (nothing is left behind). ``durable`` also fsyncs the file and its directory, so the
    block survives a power loss, not only a crash of this process."""
    tmp = f"{path}.{os.getpid()}.{next(_tmp_ids)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        try:
            bufs = [memoryview(header), memoryview(payload).cast("B")]
            at = 0
            while at < len(bufs):
                at = advance(bufs, at, os.writev(fd, bufs[at:]))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            dfd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return None
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return e


READ_TILE = 512 * 1024  # a piece still in the core's cache when it is hashed


def read_file(path: str, size: int, out: memoryview | None = None, flags: int = 0) -> ReadOutcome:
    """Read the ``size``-byte file at ``path`` and verify it. The payload lands in ``out``
    (exactly ``size - HEADER_BYTES`` bytes) when given, else in a fresh buffer the caller then
    owns. With ``flags=os.RWF_NOWAIT`` raises BlockingIOError instead of waiting for the
    device. The payload is read in ``READ_TILE`` pieces, each hashed as soon as it landed,
    while still cached: the checksum costs no second pass over the block from memory."""
    fd = pagecache.open_block_file(path)
    if not isinstance(fd, int):
        return fd
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            return CorruptBlock(f"{path}: {actual} bytes on disk, {size} expected")
        header = bytearray(HEADER_BYTES)
        if _read_at(fd, memoryview(header), 0, flags, None) != HEADER_BYTES:
            return CorruptBlock(f"{path}: shorter than its header")
        meta = BlockMeta.decode(header)
        if meta.length != size - HEADER_BYTES:
            return CorruptBlock(
                f"{path}: header says {meta.length} payload bytes, the file holds "
                f"{size - HEADER_BYTES}"
            )
        if out is None:
            payload = memoryview(np.empty(meta.length, dtype=np.uint8))  # no zero fill
        else:
            assert len(out) == size - HEADER_BYTES, "out must be exactly the payload length"
            payload = out
        digest = xxhash.xxh3_64()
        got = _read_at(fd, payload, HEADER_BYTES, flags, digest)
    except BlockingIOError:
        raise
    except CorruptBlock as e:
        return e
    except OSError as e:
        return e
    finally:
        os.close(fd)
    if got != meta.length:
        return CorruptBlock(f"{path}: {HEADER_BYTES + got} bytes read, {size} expected")
    if digest.intdigest() != meta.checksum:
        return CorruptBlock(f"checksum mismatch for block {meta.key.hex()} in {path}")
    return Block(meta, payload)


def _read_at(fd: int, buf: memoryview, offset: int, flags: int, digest) -> int:
    """Fill ``buf`` from ``offset`` tile by tile (each fed to ``digest`` as it lands); the
    bytes read, fewer at end of file."""
    got = 0
    while got < len(buf):
        piece = buf[got : got + READ_TILE]
        n = os.preadv(fd, [piece], offset + got, flags)
        if n == 0:
            break
        if digest is not None:
            digest.update(piece[:n])
        got += n
    return got


def read_cached(path: str, size: int, out: memoryview | None, nowait: int) -> ReadOutcome:
    """Like ``read_file``, but only from the page cache (never waits on the device): a block
    that is not fully cached raises BlockingIOError, to be read off-loop. Without ``out`` the
    payload is a zero-copy view of the cached pages."""
    if out is None and pagecache.AVAILABLE:
        return pagecache.map_cached(path, size)
    return read_file(path, size, out, nowait)


def read_header(path: str) -> BlockMeta | CorruptBlock | OSError | None:
    """The header when it is valid and the file size matches it; CorruptBlock when the file is
    not a whole block; OSError when it cannot be read; None when it is gone."""
    try:
        with open(path, "rb") as f:
            meta = BlockMeta.decode(f.read(HEADER_BYTES))
            if os.fstat(f.fileno()).st_size != HEADER_BYTES + meta.length:
                return CorruptBlock(f"{path}: size does not match its header")
            return meta
    except FileNotFoundError:
        return None
    except CorruptBlock as e:
        return e
    except OSError as e:
        return e


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
