"""EngineBlocks: an engine's hash chain turned into our keys from the tokens its events carry."""

from __future__ import annotations

import numpy as np

from index.engines import EngineBlocks
from index.hashing import ROOT_KEY, prefix_keys

SEED, BT = 1234, 4


def tokens(n_blocks: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n_blocks * BT).tolist()


def test_a_chain_announced_in_pieces_maps_to_our_prefix_keys() -> None:
    blocks, toks = EngineBlocks(SEED, BT), tokens(5)
    assert blocks.stored(None, ["a", "b"], toks[: 2 * BT], BT) == 2
    assert blocks.stored("b", ["c", "d", "e"], toks[2 * BT :], BT) == 3
    ours = prefix_keys(toks, SEED, BT)
    assert blocks.run(ours) == 5 and all(k in blocks for k in ours)
    # Another prompt sharing two blocks, then diverging, runs two.
    other = prefix_keys(toks[: 2 * BT] + tokens(2, seed=9), SEED, BT)
    assert blocks.run(other) == 2
    blocks.check_integrity()


def test_blocks_whose_chain_cannot_be_followed_are_never_guessed() -> None:
    blocks, toks = EngineBlocks(SEED, BT), tokens(2)
    assert blocks.stored("never-seen", ["x"], toks[:BT], BT) == 0  # unknown parent
    assert blocks.stored(None, ["y"], toks[:BT], 2 * BT) == 0  # not the namespace's block size
    assert blocks.stored(None, ["z", "w"], toks[:BT], BT) == 0  # tokens do not add up
    assert blocks.stored(None, ["v"], [-1] * BT, BT) == 0  # not uint32 token ids
    assert len(blocks) == 0 and blocks.unmapped == 5
    blocks.check_integrity()


def test_removal_and_clear_only_shrink_and_a_child_of_an_evicted_parent_is_named() -> None:
    blocks, toks = EngineBlocks(SEED, BT), tokens(3)
    ours = prefix_keys(toks, SEED, BT)
    blocks.stored(None, ["a", "b"], toks[: 2 * BT], BT)
    assert blocks.removed(["b", "unknown"]) == 1
    assert blocks.run(ours) == 1
    # vLLM may cache a block after its parent's eviction: the mapping outlives the removal.
    assert blocks.stored("b", ["c"], toks[2 * BT :], BT) == 1
    assert ours[2] in blocks and blocks.run(ours) == 1
    blocks.clear()
    assert len(blocks) == 0 and blocks.run(ours) == 0
    blocks.check_integrity()


def test_a_hash_reused_for_other_tokens_names_the_new_tokens() -> None:
    blocks = EngineBlocks(SEED, BT)
    first, second = tokens(1, seed=1), tokens(1, seed=2)
    blocks.stored(None, ["h"], first, BT)
    blocks.stored(None, ["h"], second, BT)
    assert prefix_keys(first, SEED, BT)[0] not in blocks
    assert prefix_keys(second, SEED, BT)[0] in blocks and len(blocks) == 1
    blocks.check_integrity()


def test_memory_is_bounded_under_a_flood_of_announcements() -> None:
    blocks = EngineBlocks(SEED, BT, max_blocks=64)
    for i in range(1000):
        blocks.stored(None, [i], tokens(1, seed=i), BT)
        if i % 2:
            blocks.removed([i])
    assert len(blocks) <= 64 and blocks.overflow > 0
    assert len(blocks._key_of) <= 2 * 64
    blocks.check_integrity()


def test_the_same_tokens_under_two_engine_hashes_count_once_until_both_leave() -> None:
    blocks, toks = EngineBlocks(SEED, BT), tokens(1)
    key = prefix_keys(toks, SEED, BT, ROOT_KEY)[0]
    blocks.stored(None, ["p"], toks, BT)
    blocks.stored(None, ["q"], toks, BT)
    assert len(blocks) == 1
    blocks.removed(["p"])
    assert key in blocks
    blocks.removed(["q"])
    assert key not in blocks
    blocks.check_integrity()
