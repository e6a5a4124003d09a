"""Every factory the tests share, with one name per meaning: namespaces, key chains, payloads
and blocks, and an in-process CacheService. Processes (a service, a redis-server) live in
``tests/processes.py``; fixtures in the conftests build on both. No test module imports a
conftest."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from cacheservice.service import CacheService
from index.hashing import ROOT_KEY, Namespace, prefix_keys
from tiers.base import HEADER_BYTES, Block, BlockMeta
from tiers.disk import DiskTier
from tiers.host import HostTier

# -- a service process: namespaces of 16-token blocks of 1000 bytes -------------------------

BLOCK_TOKENS = 16
BLOCK_BYTES = 1024
_names = itertools.count()


def make_namespace(**overrides) -> Namespace:
    """A namespace no other test uses (distinct model name)."""
    fields = {"model": f"test-model-{os.getpid()}-{next(_names)}", "dtype": "bfloat16"}
    fields |= {"layout": "NHD", "block_tokens": BLOCK_TOKENS}
    return Namespace(**(fields | overrides))


def make_prefix_keys(ns: Namespace, n: int, seed: int = 0) -> list[bytes]:
    """Chained prefix keys of n full blocks of pseudo-random tokens in ``ns``."""
    tokens = np.random.default_rng(seed).integers(0, 50_000, n * ns.block_tokens)
    return prefix_keys(tokens, ns.seed, ns.block_tokens)


def make_payloads(n: int, block_bytes: int = BLOCK_BYTES, seed: int = 0) -> list[bytes]:
    """n distinct pseudo-random block payloads."""
    rng = np.random.default_rng(seed + 1_000_003)
    return [rng.integers(0, 256, block_bytes, dtype=np.uint8).tobytes() for _ in range(n)]


# -- an in-process CacheService: 4-token blocks of 1 KiB in 4 KiB slots ----------------------

INPROC_BB = 1024
INPROC_SLOT = 4096
INPROC_NS = Namespace("test-model", "float16", "NHD", block_tokens=4)


def inproc_tokens(n_blocks: int, start: int = 0) -> list[int]:
    return list(range(start, start + 4 * n_blocks))


def inproc_keys(n_blocks: int, start: int = 0) -> list[bytes]:
    return prefix_keys(inproc_tokens(n_blocks, start), INPROC_NS.seed, 4)


def inproc_data(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n * INPROC_BB, dtype=np.uint8).tobytes()


async def make_inproc_service(
    tmp_path: Path, host_slots: int = 8, disk: bool = True, name: str = "a", **kw
) -> CacheService:
    host = HostTier(str(tmp_path / f"arena-{name}"), host_slots * INPROC_SLOT, INPROC_SLOT)
    lower = [DiskTier(str(tmp_path / "disk"), 64 * (INPROC_BB + HEADER_BYTES))] if disk else []
    svc = CacheService(host, lower, **kw)
    await svc.start()
    return svc


async def checked(svc: CacheService) -> None:
    await svc.drain()
    svc.check_integrity()


async def make_disk_only(svc: CacheService, n: int = 4) -> tuple[list[bytes], bytes]:
    """n stored blocks that n newer ones pushed out of an n-slot host: only disk holds them."""
    keys, data = inproc_keys(n), inproc_data(n)
    await svc.put_blocks(INPROC_NS.id, keys, ROOT_KEY, data)
    await svc.drain()
    await svc.put_blocks(INPROC_NS.id, inproc_keys(n, start=5000), ROOT_KEY, inproc_data(n, 1))
    await svc.drain()
    assert (await svc.lookup(INPROC_NS.id, keys)).tiers == ["disk"] * n
    return keys, data


def corrupt_on_disk(svc: CacheService, key: bytes) -> None:
    with open(svc.stack.lower[0]._file(key), "r+b") as f:
        f.seek(HEADER_BYTES)
        f.write(b"\x00" * 8 if f.read(8) != b"\x00" * 8 else b"\x01" * 8)


# -- tier-level blocks ----------------------------------------------------------------------


def make_payload(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes: distinct seeds give distinct payloads."""
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def make_key(i: int) -> bytes:
    return i.to_bytes(4, "little") + b"k" * 12


def make_meta(payload: bytes, i: int = 0, ns: int = 7, parent: bytes = ROOT_KEY) -> BlockMeta:
    return BlockMeta.for_payload(ns, make_key(i), parent, payload)


def make_block(meta: BlockMeta | None = None, payload: bytes | None = None) -> Block:
    payload = make_payload(1024) if payload is None else payload
    return Block(make_meta(payload) if meta is None else meta, payload)


def make_block_chain(n: int, size: int = 4096, start: int = 0) -> list[Block]:
    """n distinct blocks with chained keys and random payloads."""
    blocks = []
    parent = ROOT_KEY
    for i in range(start, start + n):
        payload = make_payload(size, seed=i)
        meta = make_meta(payload, i, parent=parent)
        blocks.append(Block(meta, payload))
        parent = meta.key
    return blocks


DAMAGES = ("flip_payload", "flip_header", "truncate", "extend")


def damage_file(path: str, how: str, cut: int = 1) -> None:
    """Damage a stored block file in place: flip one payload or header byte, cut ``cut`` bytes
    off its end (a short file), or append one (a file longer than its header says)."""
    with open(path, "r+b") as f:
        if how == "truncate":
            f.truncate(os.path.getsize(path) - cut)
        elif how == "extend":
            f.seek(0, os.SEEK_END)
            f.write(b"x")
        else:
            assert how in ("flip_payload", "flip_header"), f"unknown damage {how!r}"
            f.seek(HEADER_BYTES + 100 if how == "flip_payload" else 20)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))
