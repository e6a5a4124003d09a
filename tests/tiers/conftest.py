"""Real parts for tier tests: a redis-server on a free port, blocks with random payloads."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from index.hashing import ROOT_KEY
from tests.processes import RedisProcess, start_redis  # noqa: F401  (re-exported)
from tiers.base import HEADER_BYTES, Block, BlockMeta


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def redis_server(redis_proc: RedisProcess) -> str:
    """URL of a fresh redis-server, killed after the test."""
    return redis_proc.url


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


@pytest.fixture
def make_blocks() -> Callable[..., list[Block]]:
    """``make_blocks(n, size)``: n distinct blocks with chained keys and random payloads."""

    def make(n: int, size: int = 4096, start: int = 0) -> list[Block]:
        blocks = []
        parent = ROOT_KEY
        for i in range(start, start + n):
            payload = make_payload(size, seed=i)
            meta = make_meta(payload, i, parent=parent)
            blocks.append(Block(meta, payload))
            parent = meta.key
        return blocks

    return make


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
