"""Zero-copy reads of block files that sit in the page cache.

A warm block file is mapped and its checksum verified straight from the page-cache pages: the
caller gets a read-only view of the mapping, so a warm read costs one pass over the bytes (the
checksum) instead of a copy plus that pass. The event loop must not wait on the device, so a
file is mapped only after reads of its first, middle and last byte with RWF_NOWAIT show it is
cached (a write-then-rename file is cached or evicted as a whole, almost always); otherwise
BlockingIOError sends the read to a worker thread. A file evicted only in part is read in by
MAP_POPULATE: a bounded stall (the tier maps at most a few MiB this way), never wrong bytes.
(mincore(2) would prove residency page by page, but costs as much as the copy it saves.)

The view keeps its mapping alive. Files are only ever replaced by rename, never rewritten in
place, so a mapped block stays the bytes that were verified even if the tier later replaces or
deletes its file.
"""

from __future__ import annotations

import mmap
import os

from tiers.base import HEADER_BYTES, Block, BlockMeta, CorruptBlock

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
AVAILABLE = bool(_NOWAIT and _POPULATE)


def open_block_file(path: str) -> int | None | OSError:
    """A read-only descriptor of ``path``; None when the file is gone (a miss), the OSError
    when it cannot be opened (EMFILE, EACCES, EIO: the medium failed, the block may be fine)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        return e


def _probe_cached(fd: int, size: int) -> None:
    """Raise BlockingIOError unless the first, middle and last bytes are in the page cache."""
    probe = bytearray(1)
    for offset in (0, size // 2, size - 1):
        os.preadv(fd, [probe], offset, _NOWAIT)


def map_cached(path: str, size: int) -> Block | None | CorruptBlock | OSError:
    """The verified block of the ``size``-byte file at ``path`` as a view of its page-cache
    pages, None when the file is gone, the CorruptBlock it failed with, or the OSError of a
    medium that failed (EOPNOTSUPP: this filesystem has no RWF_NOWAIT). Raises
    BlockingIOError when part of the file is not in the page cache (read it off-loop)."""
    assert AVAILABLE, "map_cached needs RWF_NOWAIT and MAP_POPULATE (Linux)"
    fd = open_block_file(path)
    if not isinstance(fd, int):
        return fd
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            return CorruptBlock(f"{path}: {actual} bytes on disk, {size} expected")
        _probe_cached(fd, size)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    except BlockingIOError:
        raise
    except OSError as e:
        return e
    except ValueError as e:  # an empty file cannot be mapped: it is not a block
        return CorruptBlock(f"cannot map {path}: {e}")
    finally:
        os.close(fd)
    view = memoryview(mapping)
    try:
        meta = BlockMeta.decode(view)
        payload = view[HEADER_BYTES:]
        meta.verify(payload)
    except CorruptBlock as e:
        return e
    return Block(meta, payload)
