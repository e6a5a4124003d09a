"""Whole-block copies between vLLM's paged KV cache and the service's arena, through torch:
the layout both sides share, a GPU cache's staging (transfer.py) and a per-block fallback.

A block's payload in the arena is the concatenation of that block's bytes in every layer, in
layer order; a layer's block is copied as opaque bytes (the CPU backend's transposed key tiles
included). Both sides are viewed as byte matrices: the cache of layer l as ``[num_blocks,
layer_bytes]`` (vLLM's layer views are block-major, each block one dense page) and the arena as
``[num_slots, layers, layer_bytes]`` rows ``slot_bytes`` apart. Per layer, blocks whose slots
and engine ids both run consecutively move as one strided copy; a layout whose blocks are not
dense pages falls back to one copy per block and layer.

A CPU cache with dense pages does not copy here: host_copy.py moves it with numpy on two
threads and checksums each tile while it is cached, from the same byte matrices
(``rows_np``, ``host_slots_np``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from cacheservice.arena import ArenaView
from tiers.base import HEADER_BYTES


class CopyPlan(NamedTuple):
    runs: list[tuple[int, int, int]]  # (first slot, first engine block, count), in order

    def pairs(self) -> tuple[list[int], list[int]]:
        """(slots, engine blocks), one entry per block, in order."""
        slots = [s + i for s, _, n in self.runs for i in range(n)]
        return slots, [b + i for _, b, n in self.runs for i in range(n)]


def _word(layer_bytes: int) -> torch.dtype:
    # 8-byte words: fewer elements per row, so rows stay below torch's parallel grain.
    return torch.int64 if layer_bytes % 8 == 0 else torch.uint8


def _as_rows(t: torch.Tensor, layer_bytes: int) -> torch.Tensor | None:
    """``t`` ([num_blocks, ...] block-major) as a ``[num_blocks, layer_bytes]`` matrix of
    words, or None when a block is not one dense page (no view exists)."""
    try:
        rows = t.view(torch.uint8).view(t.shape[0], -1)
    except RuntimeError:
        return None
    if rows.shape[1] != layer_bytes:
        return None
    return rows.view(_word(layer_bytes))


class BlockCopier:
    def __init__(self, layers: list[torch.Tensor], layer_bytes: int) -> None:
        self.layers = layers
        self.layer_bytes = layer_bytes
        rows = [_as_rows(t, layer_bytes) for t in layers]
        self.rows: list[torch.Tensor] | None = None if any(r is None for r in rows) else rows
        self._arena: tuple[int, torch.Tensor] | None = None  # (id(view), its byte matrix)
        self._grid_np: tuple[torch.Tensor, np.ndarray] | None = None

    @property
    def rows_np(self) -> list[np.ndarray] | None:
        """numpy views of a CPU cache's dense rows (None on a GPU or without dense pages)."""
        if self.rows is None or self.layers[0].is_cuda:
            return None
        return [r.numpy() for r in self.rows]

    def host_slots(self, arena: ArenaView) -> torch.Tensor:
        """The arena's payloads as ``[num_slots, layers, layer_bytes]`` (a view, no copy)."""
        if self._arena is None or self._arena[0] != id(arena):
            whole = torch.frombuffer(arena.whole(), dtype=torch.uint8)
            start = arena.data_offset + HEADER_BYTES
            n = len(self.layers) * self.layer_bytes
            span = whole[start : start + arena.num_slots * arena.slot_bytes]
            grid = span.as_strided((arena.num_slots, n), (arena.slot_bytes, 1))
            grid = grid.view(arena.num_slots, len(self.layers), -1).view(_word(self.layer_bytes))
            self._arena = (id(arena), grid)
        return self._arena[1]

    def host_slots_np(self, arena: ArenaView) -> np.ndarray:
        """``host_slots`` as a numpy array (the same memory)."""
        grid = self.host_slots(arena)
        if self._grid_np is None or self._grid_np[0] is not grid:
            self._grid_np = (grid, grid.numpy())
        return self._grid_np[1]

    def load(self, arena: ArenaView, slots: list[int], block_ids: list[int]) -> None:
        """Arena slots -> engine blocks (``slots[i]`` fills ``block_ids[i]``), every layer."""
        self.copy(arena, self.plan(slots, block_ids), into_cache=True)

    def save(self, arena: ArenaView, slots: list[int], block_ids: list[int]) -> None:
        """Engine blocks -> arena slots (``block_ids[i]`` goes into ``slots[i]``), every layer."""
        self.copy(arena, self.plan(slots, block_ids), into_cache=False)

    def copy(self, arena: ArenaView, plan: CopyPlan, into_cache: bool) -> None:
        for layer in range(len(self.layers)):
            self.copy_layer(arena, layer, plan, into_cache)

    @staticmethod
    def plan(slots: list[int], block_ids: list[int]) -> CopyPlan:
        """The copies for ``slots[i] <-> block_ids[i]``, reused for every layer."""
        assert len(slots) == len(block_ids), "one engine block per slot"
        runs: list[tuple[int, int, int]] = []  # (first slot, first block, count)
        for slot, block in zip(slots, block_ids, strict=True):
            if runs and (last := runs[-1])[0] + last[2] == slot and last[1] + last[2] == block:
                runs[-1] = (last[0], last[1], last[2] + 1)
            else:
                runs.append((slot, block, 1))
        return CopyPlan(runs)

    def copy_layer(self, arena: ArenaView, layer: int, plan: CopyPlan, into_cache: bool) -> None:
        if self.rows is None:
            for slot, block, n in plan.runs:
                for i in range(n):
                    self._one(arena, layer, slot + i, block + i, into_cache)
            return
        rows, grid = self.rows[layer], self.host_slots(arena)[:, layer]
        for slot, block, n in plan.runs:
            if into_cache:
                rows[block : block + n].copy_(grid[slot : slot + n])
            else:
                grid[slot : slot + n].copy_(rows[block : block + n])

    def _one(self, arena: ArenaView, layer: int, slot: int, block: int, into_cache: bool) -> None:
        payload = torch.frombuffer(
            arena.payload(slot, len(self.layers) * self.layer_bytes), dtype=torch.uint8
        )
        t, n = self.layers[layer], self.layer_bytes
        page = t.select(0, block)
        raw = payload[layer * n : (layer + 1) * n].view(t.dtype).view(page.shape)
        (page.copy_(raw) if into_cache else raw.copy_(page))
