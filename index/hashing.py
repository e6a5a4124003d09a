"""Block keys: the one pure, seeded function every component hashes tokens with.

Prefix key of block i: ``xxh3_128(key(i-1) || tokens of block i, seed=namespace)``; block 0
chains from ``ROOT_KEY``. Chunk key: ``xxh3_128(CHUNK_DOMAIN || tokens, seed=namespace)``; it has
no parent, so the same tokens give the same chunk key wherever they sit in a prompt. The chunk
domain tag keeps a chunk key from ever equalling the prefix key of the same tokens.

Tokens are hashed as little-endian uint32, so the Python list, numpy and torch forms of one
prompt give identical keys.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import msgpack
import numpy as np
import xxhash

KEY_BYTES = 16
ROOT_KEY = bytes(KEY_BYTES)
FORMAT_VERSION = 1
CHUNK_DOMAIN = b"cacheservice/chunk\x00"


@dataclass(frozen=True)
class Namespace:
    """Everything that makes two blocks' KV bytes incompatible. Two namespaces that differ in
    any field get different seeds, so their keys can never collide."""

    model: str
    dtype: str
    layout: str
    block_tokens: int
    tp_rank: int = 0
    tp_size: int = 1
    salt: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, got {self.block_tokens}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} must be in [0, tp_size={self.tp_size})")
        if not self.model:
            raise ValueError("model must name the model (e.g. its HF id or path)")

    @cached_property
    def seed(self) -> int:
        # Canonical encoding: field order is fixed by the dataclass, msgpack is deterministic.
        # Cached (the fields are frozen): asdict costs ~90 us, and writers ask per block.
        return xxhash.xxh3_64_intdigest(msgpack.packb(list(asdict(self).values())))

    @property
    def id(self) -> str:
        return f"{self.seed:016x}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Namespace:
        return cls(**d)


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    if isinstance(tokens, list | tuple):
        # array.array converts a list 4x faster than numpy and range-checks while it does
        try:
            packed = array.array("I", tokens)
        except OverflowError:
            raise ValueError("token ids must fit in uint32") from None
        except TypeError:
            raise ValueError("token ids must be integers") from None
        if packed.itemsize != 4 or sys.byteorder != "little":
            return np.asarray(packed, dtype="<u4").tobytes()
        return packed.tobytes()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in uint32")
    return arr.astype("<u4", copy=False).tobytes()


def prefix_keys(
    tokens: Sequence[int] | np.ndarray,
    seed: int,
    block_tokens: int,
    parent: bytes = ROOT_KEY,
) -> list[bytes]:
    """Chained keys of every *full* block of ``tokens``; a trailing partial block gets none.

    ``parent`` continues a chain (the key of the block just before ``tokens``)."""
    assert len(parent) == KEY_BYTES, "parent must be a 16-byte block key"
    data = token_bytes(tokens)
    step = 4 * block_tokens
    digest = xxhash.xxh3_128_digest
    keys: list[bytes] = []
    append = keys.append
    for off in range(0, len(data) - step + 1, step):
        # bytes slices, not memoryview ones: bytes + bytes is one allocation (2x faster)
        parent = digest(parent + data[off : off + step], seed)
        append(parent)
    return keys


def chunk_key(tokens: Sequence[int] | np.ndarray, seed: int) -> bytes:
    """Position-independent key of a chunk (RAG passage, tool output) of any length."""
    return xxhash.xxh3_128_digest(CHUNK_DOMAIN + token_bytes(tokens), seed)


def chunk_block_keys(
    tokens: Sequence[int] | np.ndarray, seed: int, block_tokens: int
) -> list[bytes]:
    """Keys of the blocks that hold a chunk's KV, a trailing partial block included: a chain
    rooted at the chunk key, so they never meet prefix keys."""
    data = token_bytes(tokens)
    n = len(data) // 4
    full = prefix_keys(tokens, seed, block_tokens, parent=chunk_key(tokens, seed))
    if n % block_tokens:
        last_parent = full[-1] if full else chunk_key(tokens, seed)
        tail = data[4 * (n - n % block_tokens) :]
        full.append(xxhash.xxh3_128_digest(last_parent + tail, seed))
    return full


SPOT_LINES = 64  # lines sampled per block, evenly spread, plus its last line
SPOT_LINE = 64


def spot_checksum(payload: bytes | bytearray | memoryview) -> int:
    """xxh3_64 of ``SPOT_LINES`` 64-byte lines evenly spread over ``payload`` plus its last
    line (all of it under 4 KiB): what a commit checks instead of re-hashing every byte. It
    tells the bytes a writer put in a slot from another writer's block (or a replaced arena);
    the full xxh3_64 the writer also gives is what every reader verifies, so a smaller
    scribble is still a miss. A fixed count, not one line per page: each sampled line costs
    a page walk, so a denser sample of a 32 MiB block cost ~2.6 ms on each side of a commit
    (80 ms per GiB stored, measured), the copy itself ~130 ms."""
    arr = np.frombuffer(payload, dtype=np.uint8)
    n = len(arr)
    stride = n // SPOT_LINES // SPOT_LINE * SPOT_LINE
    if stride <= SPOT_LINE:
        return xxhash.xxh3_64_intdigest(arr)
    lines = arr[: SPOT_LINES * stride].reshape(SPOT_LINES, stride)[:, :SPOT_LINE]
    return xxhash.xxh3_64_intdigest(
        np.ascontiguousarray(lines).tobytes() + arr[n - SPOT_LINE :].tobytes()
    )
