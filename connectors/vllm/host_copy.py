"""Copies between a CPU KV cache and the arena that checksum the bytes as they move.

A block's arena payload is its bytes in every layer, in layer order, and its checksum is the
xxh3_64 of that payload. Hashing it in a separate pass reads every byte from memory again:
beside the copy that is a third more memory traffic, and on a small host the hashing thread
and the copy thread share the same two cores (measured: a commit thread's hash halved the
engine thread's copy). Here the work is cut into tiles — a few consecutive blocks of one
layer, about ``TILE_BYTES`` — and each tile is hashed right after its copy, while it is still
in the core's cache, into one streaming xxh3 per block fed layer after layer (streaming xxh3
over the pieces equals xxh3 of the whole payload, which is what readers verify). What is
hashed is the engine's side of the copy: the blocks a save read from, the blocks a load wrote
into. A load's digests therefore describe the KV the engine will attend over, not the arena's
bytes, which another writer could change after the copy.

Tiles go to two threads, the caller's and one helper, which take groups of blocks from a
shared counter, so a neighbour holding one core slows the copy down to one thread's speed,
never below (a static split would wait for the slower half; torch's intra-op pool collapsed
20x that way). numpy's copy and xxhash release the GIL; each thread's Python between calls is
a few microseconds, so neither waits a switch interval for the other.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import xxhash

TILE_BYTES = 512 * 1024  # half of a core's L2 here: the tile is still cached when hashed
SPLIT_BYTES = 8 << 20  # below this a helper thread's hand-off costs more than it saves


class _Group(NamedTuple):
    """``count`` pairs from index ``at``: slot ``slot + i * slot_step`` with engine block
    ``block + i * block_step``. Either side may run downwards: vLLM hands out a request's
    blocks in descending order once its free queue has turned over (measured in vLLM 0.32:
    31, 30, 29, ... against ascending slots), and a run each way is one strided copy per
    layer where single blocks cost a copy and a hash call per layer each."""

    at: int
    slot: int
    block: int
    count: int
    slot_step: int = 1
    block_step: int = 1


class HostCopier:
    """``rows[l]`` is layer ``l`` of a CPU KV cache as a ``[num_blocks, words]`` numpy matrix;
    the arena grid is ``[num_slots, layers, words]`` (views of the same memory, no copies)."""

    def __init__(self, rows: list[np.ndarray], helper: ThreadPoolExecutor | None) -> None:
        self.rows = rows
        self.layer_bytes = rows[0].shape[1] * rows[0].itemsize
        self.per_group = max(1, TILE_BYTES // self.layer_bytes)
        self._helper = helper

    def save(self, grid: np.ndarray, slots: list[int], blocks: list[int]) -> list[int]:
        """Engine blocks -> arena slots (``blocks[i]`` into ``slots[i]``); the xxh3_64 of each
        payload written, in order."""
        return self._run(grid, slots, blocks, into_cache=False)

    def load(self, grid: np.ndarray, slots: list[int], blocks: list[int]) -> list[int]:
        """Arena slots -> engine blocks (``slots[i]`` into ``blocks[i]``); the xxh3_64 of what
        each engine block now holds, in order (compare with the writer's checksums)."""
        return self._run(grid, slots, blocks, into_cache=True)

    def groups(self, slots: list[int], blocks: list[int]) -> list[_Group]:
        """Runs of slots and blocks each moving by one (up or down), cut into tiles of at most
        ``per_group``."""
        assert len(slots) == len(blocks), "one engine block per slot"
        out: list[_Group] = []
        for i, (slot, block) in enumerate(zip(slots, blocks, strict=True)):
            last = out[-1] if out else None
            if last is not None and last.count < self.per_group:
                ds = slot - (last.slot + (last.count - 1) * last.slot_step)
                db = block - (last.block + (last.count - 1) * last.block_step)
                if last.count == 1 and ds in (1, -1) and db in (1, -1):
                    out[-1] = last._replace(count=2, slot_step=ds, block_step=db)
                    continue
                if last.count > 1 and ds == last.slot_step and db == last.block_step:
                    out[-1] = last._replace(count=last.count + 1)
                    continue
            out.append(_Group(i, slot, block, 1))
        return out

    def _run(self, grid, slots: list[int], blocks: list[int], into_cache: bool) -> list[int]:
        groups = self.groups(slots, blocks)
        digests = [0] * len(slots)
        taken = itertools.count()  # next() is atomic under the GIL: each group runs once

        def work() -> None:
            while (g := next(taken)) < len(groups):
                self._group(grid, groups[g], into_cache, digests)

        big = len(slots) * self.layer_bytes * len(self.rows) >= SPLIT_BYTES
        other = self._helper.submit(work) if big and self._helper is not None else None
        try:
            work()
        finally:
            # A helper that never got a core is not waited for; one that started is, as it
            # may be inside a group (and its error, if any, is the caller's).
            if other is not None and not other.cancel():
                other.result()
        return digests

    def _group(self, grid: np.ndarray, g: _Group, into_cache: bool, out: list[int]) -> None:
        hashes = [xxhash.xxh3_64() for _ in range(g.count)]
        for layer, rows in enumerate(self.rows):
            engine = _run_view(rows, g.block, g.count, g.block_step)
            arena = _run_view(grid, g.slot, g.count, g.slot_step)[:, layer]
            if into_cache:
                np.copyto(engine, arena)
            else:
                np.copyto(arena, engine)
            for h, page in zip(hashes, engine, strict=True):
                h.update(page)
        for i, h in enumerate(hashes):
            out[g.at + i] = h.intdigest()


def _run_view(a: np.ndarray, first: int, count: int, step: int) -> np.ndarray:
    """Rows ``first, first + step, ...`` (``count`` of them) of ``a`` as a view."""
    if step == 1:
        return a[first : first + count]
    return a[first - count + 1 : first + 1][::-1]
