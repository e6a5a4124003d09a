"""CPU cache <-> arena copies that checksum as they copy: bytes land exactly where the arena
format says, the digests equal xxh3_64 of each whole payload (what readers verify), a load's
digests describe what the engine holds (so a scribbled slot is caught), and the two-thread
split neither changes a byte nor waits for a helper that never got a core."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from cacheservice.arena import ArenaView
from connectors.vllm import host_copy
from connectors.vllm.copies import BlockCopier
from connectors.vllm.host_copy import HostCopier
from tiers.host import HostTier

LAYERS, BLOCKS = 3, 12


def layout(heads: int, tokens: int, dim: int) -> tuple[tuple[int, ...], int]:
    return (BLOCKS, 2, tokens, heads, dim), 2 * tokens * heads * dim * 4  # float32


@pytest.fixture
def make_arena(tmp_path: Path):
    made = []

    def make(layer_bytes: int, slots: int = BLOCKS) -> ArenaView:
        slot = -(-(LAYERS * layer_bytes + 64) // 4096) * 4096
        host = HostTier(str(tmp_path / f"arena{len(made)}"), slots * slot, slot)
        view = ArenaView.open(host.path)
        made.append((host, view))
        return view

    yield make
    for host, view in made:
        view.close()
        host.shutdown()


def payload(layers: list[torch.Tensor], block: int) -> bytes:
    return b"".join(t[block].contiguous().numpy().tobytes() for t in layers)


def copiers(layers, helper=None) -> tuple[BlockCopier, HostCopier]:
    blocks = BlockCopier(layers, layers[0][0].numel() * 4)
    return blocks, HostCopier(blocks.rows_np, helper)


@pytest.mark.parametrize(("heads", "tokens", "dim"), [(2, 32, 16), (8, 64, 128)])
@pytest.mark.parametrize("threads", [False, True])
def test_round_trip_digests_are_whole_payload_xxh3(make_arena, heads, tokens, dim, threads,
                                                   monkeypatch) -> None:  # fmt: skip
    shape, layer_bytes = layout(heads, tokens, dim)
    arena = make_arena(layer_bytes)
    gen = torch.Generator().manual_seed(heads)
    layers = [torch.randn(*shape, generator=gen) for _ in range(LAYERS)]
    helper = ThreadPoolExecutor(1) if threads else None
    if threads:
        monkeypatch.setattr(host_copy, "SPLIT_BYTES", 1)  # split even these small copies
    blocks_copier, host = copiers(layers, helper)
    grid = blocks_copier.host_slots_np(arena)
    # runs each way (vLLM's blocks often descend), and scattered ids
    slots, blocks = [5, 6, 7, 0, 9, 10, 11, 4, 3, 2], [1, 2, 3, 8, 6, 5, 4, 9, 10, 11]
    sums = host.save(grid, slots, blocks)
    for slot, block, got in zip(slots, blocks, sums, strict=True):
        stored = bytes(arena.payload(slot, LAYERS * layer_bytes))
        assert stored == payload(layers, block)
        assert got == xxhash.xxh3_64_intdigest(stored)
    back = [torch.zeros_like(t) for t in layers]
    back_copier, back_host = copiers(back, helper)
    into = [0, 1, 2, 3, 11, 10, 9, 6, 5, 7]
    loaded = back_host.load(back_copier.host_slots_np(arena), slots, into)
    assert loaded == sums
    for i, block in zip(into, blocks, strict=True):
        assert all(torch.equal(b[i], t[block]) for t, b in zip(layers, back, strict=True))
    untouched = set(range(BLOCKS)) - set(into)
    assert not any(b[u].any() for b in back for u in untouched)
    if helper:
        helper.shutdown()


def test_groups_are_runs_cut_into_cache_sized_tiles(make_arena) -> None:
    shape, layer_bytes = layout(8, 64, 128)  # 512 KiB a layer: one block per tile
    _, host = copiers([torch.zeros(*shape) for _ in range(LAYERS)])
    assert host.per_group == 1
    assert len(host.groups([0, 1, 2], [4, 5, 6])) == 3
    shape, layer_bytes = layout(2, 32, 16)  # 8 KiB a layer: 64 blocks per tile
    _, host = copiers([torch.zeros(*shape) for _ in range(LAYERS)])
    groups = host.groups([0, 1, 2, 7, 8], [4, 5, 6, 0, 1])
    assert [(g.at, g.slot, g.block, g.count) for g in groups] == [(0, 0, 4, 3), (3, 7, 0, 2)]
    # descending either side: still one run each (vLLM 0.32 hands out 31, 30, 29, ...)
    runs = host.groups([0, 1, 2, 3, 9, 8, 7, 20, 4], [9, 8, 7, 6, 1, 2, 3, 40, 30])
    assert [tuple(g) for g in runs] == [
        (0, 0, 9, 4, 1, -1),
        (4, 9, 1, 3, -1, 1),
        (7, 20, 40, 1, 1, 1),
        (8, 4, 30, 1, 1, 1),
    ]


def test_a_load_digest_sees_a_scribbled_slot(make_arena) -> None:
    shape, layer_bytes = layout(2, 32, 16)
    arena = make_arena(layer_bytes)
    layers = [torch.randn(*shape) for _ in range(LAYERS)]
    src, host = copiers(layers)
    grid = src.host_slots_np(arena)
    sums = host.save(grid, [0, 1, 2], [0, 1, 2])
    raw = np.frombuffer(arena.payload(1, LAYERS * layer_bytes), dtype=np.uint8)
    raw[2 * layer_bytes + 5] ^= 0x40  # one bit of the last layer of the middle block
    back = [torch.zeros_like(t) for t in layers]
    dst, back_host = copiers(back)
    got = back_host.load(dst.host_slots_np(arena), [0, 1, 2], [3, 4, 5])
    assert got[0] == sums[0] and got[2] == sums[2] and got[1] != sums[1]


def test_a_helper_without_a_core_is_not_waited_for(make_arena, monkeypatch) -> None:
    """The helper is busy (a stand-in for a thread the OS does not schedule): the caller's
    thread does every group and returns without waiting for it."""
    shape, layer_bytes = layout(2, 32, 16)
    arena = make_arena(layer_bytes)
    monkeypatch.setattr(host_copy, "SPLIT_BYTES", 1)
    helper = ThreadPoolExecutor(1)
    release = threading.Event()
    helper.submit(release.wait, 30)
    try:
        layers = [torch.randn(*shape) for _ in range(LAYERS)]
        src, host = copiers(layers, helper)
        sums = host.save(src.host_slots_np(arena), list(range(8)), list(range(8)))
        assert not release.is_set()  # returned while the helper was still held
        for i in range(8):
            assert sums[i] == xxhash.xxh3_64_intdigest(payload(layers, i))
    finally:
        release.set()
        helper.shutdown()
