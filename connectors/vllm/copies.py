"""Whole-block copies between vLLM's paged KV cache and the service's arena: each block of each
layer is one contiguous row on both sides, moved by one memcpy-like torch copy that releases
the GIL.

A block's payload in the arena is the concatenation of that block's bytes in every layer, in
layer order; a layer's block is copied as opaque bytes (the CPU backend's transposed key tiles
included). Both sides are viewed as byte matrices: the cache of layer l as ``[num_blocks,
layer_bytes]`` (vLLM's layer views are block-major, each block one dense page) and the arena as
``[num_slots, layers, layer_bytes]`` rows ``slot_bytes`` apart. A layout whose blocks are not
dense pages falls back to one copy per block and layer.
"""

from __future__ import annotations

import torch

from cacheservice.arena import ArenaView
from tiers.base import HEADER_BYTES


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

    def _slots(self, arena: ArenaView) -> torch.Tensor:
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

    def load(self, arena: ArenaView, slots: list[int], block_ids: list[int]) -> None:
        """Arena slots -> engine blocks (``slots[i]`` fills ``block_ids[i]``)."""
        self._copy(arena, slots, block_ids, into_cache=True)

    def save(self, arena: ArenaView, slots: list[int], block_ids: list[int]) -> None:
        """Engine blocks -> arena slots (``block_ids[i]`` goes into ``slots[i]``)."""
        self._copy(arena, slots, block_ids, into_cache=False)

    def _copy(self, arena: ArenaView, slots: list[int], blocks: list[int], into_cache: bool):
        if not slots:
            return
        if self.rows is None:
            for slot, block in zip(slots, blocks, strict=True):
                self._one(arena, slot, block, into_cache)
            return
        grid = self._slots(arena)
        # One row copy per block and layer: each is a plain memcpy below torch's parallel
        # grain, so it never competes for the intra-op threads the engine computes with (a
        # batched index_select/index_copy_ measured 1.7x slower inside vLLM for that reason).
        for slot, block in zip(slots, blocks, strict=True):
            for layer, rows in enumerate(self.rows):
                if into_cache:
                    rows[block].copy_(grid[slot, layer])
                else:
                    grid[slot, layer].copy_(rows[block])

    def _one(self, arena: ArenaView, slot: int, block: int, into_cache: bool) -> None:
        payload = torch.frombuffer(
            arena.payload(slot, len(self.layers) * self.layer_bytes), dtype=torch.uint8
        )
        off, n = 0, self.layer_bytes
        for t in self.layers:
            page = t.select(0, block)
            raw = payload[off : off + n].view(t.dtype).view(page.shape)
            (page.copy_(raw) if into_cache else raw.copy_(page))
            off += n
