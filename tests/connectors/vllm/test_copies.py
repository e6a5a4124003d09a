"""Whole-block copies through torch between a paged KV cache and a real arena: per layer one
strided copy per run of consecutive ids, a per-block fallback for pages that are not dense;
bytes land exactly where the arena format says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cacheservice.arena import ArenaView
from connectors.vllm.copies import BlockCopier
from connectors.vllm.transfer import prefault
from tiers.host import HostTier

LAYERS, BLOCKS = 3, 10
LAYER_BYTES = 2 * 32 * 16 * 4  # [heads 2, tokens 32, dims 16] float32


@pytest.fixture
def arena(tmp_path: Path):
    slot = -(-(LAYERS * LAYER_BYTES + 64) // 4096) * 4096
    host = HostTier(str(tmp_path / "arena"), 8 * slot, slot)
    view = ArenaView.open(str(tmp_path / "arena"))
    yield view
    view.close()
    host.shutdown()


def expected(layers: list[torch.Tensor], block: int) -> np.ndarray:
    return np.concatenate([t[block].contiguous().numpy().view(np.uint8).ravel() for t in layers])


@pytest.mark.parametrize("dense", [True, False])
def test_save_then_load_round_trips(arena: ArenaView, dense: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    if dense:
        layers = [torch.randn(BLOCKS, 2, 32, 16, generator=gen) for _ in range(LAYERS)]
    else:  # blocks are not one dense page: the fallback path
        layers = [torch.randn(2, BLOCKS, 32, 16, generator=gen).transpose(0, 1) for _ in range(3)]
    copier = BlockCopier(layers, LAYER_BYTES)
    assert (copier.rows is not None) == dense
    copier.save(arena, [5, 2, 7], [1, 4, 9])
    for slot, block in zip([5, 2, 7], [1, 4, 9], strict=True):
        got = np.frombuffer(arena.payload(slot, LAYERS * LAYER_BYTES), dtype=np.uint8)
        assert (got == expected(layers, block)).all()
    back = [torch.zeros_like(t) for t in layers]
    loader = BlockCopier(back, LAYER_BYTES)
    loader.load(arena, [5, 2, 7], [0, 3, 8])
    for t, b in zip(layers, back, strict=True):
        assert torch.equal(b[0], t[1]) and torch.equal(b[3], t[4]) and torch.equal(b[8], t[9])
        assert not b[1].any() and not b[9].any()  # nothing else was touched


@pytest.mark.parametrize(
    ("slots", "blocks", "runs"),
    [
        ([0, 1, 2, 3], [4, 5, 6, 7], 1),  # a fresh request: one copy per layer
        ([6, 7, 0, 1], [0, 1, 2, 3], 2),
        ([5, 2, 7, 0, 3, 6], [1, 4, 9, 0, 2, 8], 6),
    ],
)
def test_plans_are_runs_and_loads_touch_only_their_blocks(arena, slots, blocks, runs) -> None:
    gen = torch.Generator().manual_seed(2)
    layers = [torch.randn(BLOCKS, 2, 32, 16, generator=gen) for _ in range(LAYERS)]
    copier = BlockCopier(layers, LAYER_BYTES)
    copier.save(arena, slots, list(range(len(slots))))
    back = [torch.zeros_like(t) for t in layers]
    assert all(prefault(t) for t in back)  # backs the pages, changes no byte
    assert not any(t.any() for t in back)
    loader = BlockCopier(back, LAYER_BYTES)
    plan = loader.plan(slots, blocks)
    assert len(plan.runs) == runs and plan.pairs() == (slots, blocks)
    loader.copy_layer(arena, 0, plan, into_cache=True)  # one layer: only that layer moves
    assert back[0][blocks[0]].any() and not back[1].any() and not back[2].any()
    loader.copy(arena, plan, into_cache=True)
    for i, block in enumerate(blocks):
        for t, b in zip(layers, back, strict=True):
            assert torch.equal(b[block], t[i])
    untouched = set(range(BLOCKS)) - set(blocks)
    assert not any(b[u].any() for b in back for u in untouched)
