"""The tier contract and the self-describing block format every tier stores.

Block on any medium = 64-byte header + payload. The header names the block (namespace seed,
key, parent key) so a tier's contents can rebuild the index after a restart, and carries the
xxh3_64 checksum of the payload so a corrupt or short read is detected and becomes a miss.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import xxhash

from index.hashing import KEY_BYTES

MAGIC = b"CSKV"
CODEC_VERSION = 1
_HEADER = struct.Struct("<4sHHQQ16s16sQ")
HEADER_BYTES = _HEADER.size
assert HEADER_BYTES == 64, "header layout changed: bump CODEC_VERSION and fix readers"

FLAG_MANIFEST = 1  # payload is index metadata (e.g. a chunk entry), not KV

# The shared-memory arena's header (PROTOCOL.md, "Arena"): magic, version, slot_bytes,
# num_slots, data_offset. The service writes it (tiers/host.py), clients read it
# (cacheservice/arena.py).
ARENA_MAGIC = b"CSAR"
ARENA_VERSION = 1
ARENA_HEADER_BYTES = 4096
ARENA_HEADER = struct.Struct("<4sH2xQQQ")


class TierStartError(RuntimeError):
    """A tier cannot serve as configured (e.g. the server refused our credentials): a clear
    start-up error, never a tier that silently misses forever."""


class CorruptBlock(Exception):
    """A stored block failed its header or checksum check. Tiers turn this into a miss."""


@dataclass
class TierErrors:
    """What went wrong in one tier, kept apart: only ``corrupt`` means the stored bytes lied
    (and were deleted); an ``io_error`` (EMFILE, EIO, a refused flag, a dropped connection) or
    ``no_space`` leaves stored blocks alone."""

    corrupt: int = 0  # header, length or checksum mismatch: the block was removed
    io_error: int = 0  # the medium failed a read or write: a miss or a refused put
    no_space: int = 0  # the medium itself was full (ENOSPC), whatever the budget said
    scan_removed: int = 0  # blocks the start-up scan found broken and removed
    skipped: int = 0  # headers that parse but cannot be indexed (cycles, self-parents)


def checksum(payload: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(payload)


@dataclass(frozen=True)
class BlockMeta:
    ns: int  # Namespace.seed
    key: bytes
    parent: bytes
    length: int
    checksum: int
    flags: int = 0

    def __post_init__(self) -> None:
        assert len(self.key) == KEY_BYTES and len(self.parent) == KEY_BYTES, "keys are 16 bytes"

    @classmethod
    def for_payload(
        cls, ns: int, key: bytes, parent: bytes, payload: bytes | memoryview, flags: int = 0
    ) -> BlockMeta:
        return cls(ns, key, parent, len(payload), checksum(payload), flags)

    def encode(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            CODEC_VERSION,
            self.flags,
            self.length,
            self.checksum,
            self.key,
            self.parent,
            self.ns,
        )

    @classmethod
    def decode(cls, header: bytes | memoryview) -> BlockMeta:
        if len(header) < HEADER_BYTES:
            raise CorruptBlock(f"short header: {len(header)} < {HEADER_BYTES} bytes")
        magic, version, flags, length, csum, key, parent, ns = _HEADER.unpack_from(header)
        if magic != MAGIC or version != CODEC_VERSION:
            raise CorruptBlock(f"bad magic/version {magic!r}/{version}")
        return cls(ns, key, parent, length, csum, flags)

    def verify(self, payload: bytes | memoryview) -> None:
        """Raise CorruptBlock unless ``payload`` is exactly the bytes this header describes."""
        if len(payload) != self.length:
            raise CorruptBlock(f"short payload: {len(payload)} != {self.length} bytes")
        if checksum(payload) != self.checksum:
            raise CorruptBlock(f"checksum mismatch for block {self.key.hex()}")


def encode_block(meta: BlockMeta, payload: bytes | memoryview) -> bytes:
    return meta.encode() + bytes(payload)


def decode_block(buf: bytes | memoryview) -> Block:
    """Parse and verify header + payload; raises CorruptBlock."""
    meta = BlockMeta.decode(buf)
    payload = memoryview(buf)[HEADER_BYTES:]
    meta.verify(payload)
    return Block(meta, payload)


@dataclass(frozen=True)
class Block:
    meta: BlockMeta
    payload: bytes | memoryview


class Tier(ABC):
    """A store of whole blocks keyed by 16-byte block key.

    Contract:
    - Tiers never evict on their own. ``put`` returns False when the block does not fit
      (``used_bytes + size > capacity_bytes``) or the medium failed; the TierStack then evicts
      through the index's LRU and retries. ``delete`` is the only way bytes leave a tier.
    - ``put`` copies ``payload``; the caller keeps ownership of its buffer. A block is either
      fully visible or absent: readers never observe a half-written block.
    - ``get`` verifies the checksum. A missing, short, corrupt or failed read returns None (a
      miss) and never raises; a corrupt block is deleted so it cannot be hit again.
      The returned payload is owned by the caller, except for tiers documented as zero-copy
      (HostTier), whose memoryview stays valid only while the block is pinned in the index.
    - All methods are safe to call from one asyncio loop; blocking I/O runs off-loop.
    - Failures are counted in ``errors`` (TierErrors). Only a block whose bytes fail their
      header/length/checksum check is deleted; after an I/O error ``contains`` still says
      True, which is how the stack tells a lost block from a failed read.
    """

    name: str = "tier"

    def __init__(self) -> None:
        self.errors = TierErrors()

    @property
    @abstractmethod
    def capacity_bytes(self) -> int: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @abstractmethod
    async def put(self, meta: BlockMeta, payload: bytes | memoryview) -> bool: ...

    @abstractmethod
    async def get(self, key: bytes) -> Block | None: ...

    @abstractmethod
    async def contains(self, key: bytes) -> bool: ...

    @abstractmethod
    async def delete(self, key: bytes) -> bool: ...

    @abstractmethod
    def scan(self) -> AsyncIterator[BlockMeta]:
        """Every block's header, for rebuilding the index after a restart."""

    async def get_into(self, key: bytes, out: memoryview) -> BlockMeta | None:
        """Read the payload of ``key`` into ``out[:meta.length]`` and return its verified meta.

        None, like ``get``, for a missing, short or corrupt block (deleted as in ``get``) and
        also for a block longer than ``out`` (left alone; read it with ``get``). On None the
        bytes of ``out`` are unspecified: the caller must not publish them. Tiers that can
        read straight into ``out`` override this copying default."""
        block = await self.get(key)
        if block is None or block.meta.length > len(out):
            return None
        out[: block.meta.length] = memoryview(block.payload).cast("B")
        return block.meta

    async def put_many(self, items: Sequence[tuple[BlockMeta, bytes | memoryview]]) -> list[bool]:
        return [await self.put(meta, payload) for meta, payload in items]

    async def get_many(self, keys: Sequence[bytes]) -> list[Block | None]:
        return [await self.get(k) for k in keys]

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return [await self.contains(k) for k in keys]

    async def start(self) -> None:
        """Open connections/files. Called once from the service's cleanup_ctx."""

    async def close(self) -> None:
        """Release OS resources. Idempotent."""

    def check_integrity(self) -> None:
        """Assert internal invariants (accounting matches contents)."""
