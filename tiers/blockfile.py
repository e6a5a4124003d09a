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


def read_file(path: str, size: int, out: memoryview | None = None, flags: int = 0) -> ReadOutcome:
    """Read the ``size``-byte file at ``path`` and verify it. The payload lands in ``out``
    (exactly ``size - HEADER_BYTES`` bytes) when given, else in a fresh buffer the caller then
    owns. With ``flags=os.RWF_NOWAIT`` raises BlockingIOError instead of waiting for the
    device."""
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
    got = at = 0
    try:
        while at < len(bufs) and got <= size:
            n = os.preadv(fd, bufs[at:], got, flags)
            if n == 0:
                break
            got += n
            at = advance(bufs, at, n)
    except BlockingIOError:
        raise
    except OSError as e:
        return e
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
