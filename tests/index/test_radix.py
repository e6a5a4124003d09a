from __future__ import annotations

import random

import pytest

from index.hashing import ROOT_KEY, chunk_block_keys, chunk_key, prefix_keys
from index.radix import PrefixTree

SEED = 1234


def radix_keys(n: int, start: int = 0) -> list[bytes]:
    return prefix_keys(list(range(start, start + 4 * n)), SEED, 4)


def make_tree(keys: list[bytes], tier: str = "host", parent: bytes = ROOT_KEY) -> PrefixTree:
    tree = PrefixTree()
    insert_chain(tree, keys, tier, parent)
    return tree


def insert_chain(tree: PrefixTree, keys: list[bytes], tier: str, parent: bytes = ROOT_KEY):
    for k in keys:
        tree.insert(parent, k, tier, 100)
        parent = k


def test_match_full_partial_and_none():
    keys = radix_keys(10)
    tree = make_tree(keys[:6])
    tree.check_integrity()
    assert tree.match(keys[:6]).length == 6
    r = tree.match(keys)
    assert r.length == 6 and r.tiers == ["host"] * 6
    assert tree.match(radix_keys(3, start=999)).length == 0
    assert tree.match([]).length == 0
    assert len(tree) == 6


def test_match_reports_fastest_tier():
    keys = radix_keys(4)
    tree = make_tree(keys, "disk")
    tree.add_tier(keys[1], "host")
    tree.add_tier(keys[2], "redis")
    assert tree.match(keys).tiers == ["disk", "host", "disk", "disk"]
    tree.remove_tier(keys[1], "disk")
    tree.remove_tier(keys[1], "host") if False else None
    assert tree.match(keys).tiers == ["disk", "host", "disk", "disk"]
    tree.check_integrity()


def test_branching_prompts_share_prefix():
    a = radix_keys(8)
    tree = make_tree(a)
    b = prefix_keys(list(range(16)) + [777] * 12, SEED, 4)  # shares 4 blocks with a
    assert b[:4] == a[:4] and b[4] != a[4]
    insert_chain(tree, b[4:], "host", parent=b[3])
    assert tree.match(b).length == 7
    assert tree.match(a).length == 8
    tree.check_integrity()


def test_broken_chain_falls_back_to_walk():
    # flat inserts (every key under ROOT) must not be matched as a chain
    keys = radix_keys(5)
    tree = PrefixTree()
    for k in keys:
        tree.insert(ROOT_KEY, k, "host", 1)
    assert tree.match(keys).length == 1
    assert tree.present(keys) == [True] * 5
    tree.check_integrity()


def test_chain_under_wrong_parent_is_not_a_hit():
    keys = radix_keys(4)
    other = radix_keys(2, start=500)
    tree = make_tree(other)
    tree.insert(ROOT_KEY, keys[0], "host", 1)
    # keys[1] claimed to follow other[0] (a lying client): depth 2 but not under keys[0]
    tree.insert(other[0], keys[1], "host", 1)
    assert tree.match(keys).length == 1
    tree.check_integrity()


def test_unknown_parent_makes_stub_then_reattaches():
    keys = radix_keys(6)
    tree = PrefixTree()
    insert_chain(tree, keys[3:], "disk", parent=keys[2])
    tree.check_integrity()
    assert tree.match(keys).length == 0
    assert tree.get(keys[2]) is None  # stub is not a block
    assert len(tree) == 3
    insert_chain(tree, keys[:3], "host")
    tree.check_integrity()
    r = tree.match(keys)
    assert r.length == 6 and r.tiers == ["host"] * 3 + ["disk"] * 3


def test_chunk_blocks_hang_under_chunk_key():
    doc = list(range(300, 310))
    ck = chunk_key(doc, SEED)
    ckeys = chunk_block_keys(doc, SEED, 4)
    tree = make_tree(ckeys, "host", parent=ck)
    tree.check_integrity()
    assert tree.match(ckeys).length == 3
    assert ck not in tree
    for k in reversed(ckeys):
        tree.remove_tier(k, "host")
    assert len(tree) == 0 and tree.match(ckeys).length == 0
    tree.check_integrity()


def test_remove_last_tier_of_internal_node_makes_stub():
    keys = radix_keys(5)
    tree = make_tree(keys, "disk")
    tree.remove_tier(keys[2], "disk")  # e.g. corrupt on disk
    tree.check_integrity()
    assert tree.match(keys).length == 2
    assert len(tree) == 4
    tree.insert(keys[1], keys[2], "host", 100)  # re-stored: the chain hits again
    tree.check_integrity()
    assert tree.match(keys).length == 5


def test_remove_leaf_drops_and_unknown_is_noop():
    keys = radix_keys(3)
    tree = make_tree(keys)
    tree.remove_tier(keys[2], "host")
    tree.remove_tier(keys[2], "host")
    tree.remove_tier(b"x" * 16, "host")
    assert len(tree) == 2 and tree.blocks_in("host") == 2
    with pytest.raises(KeyError):
        tree.add_tier(keys[2], "disk")
    tree.check_integrity()


def test_evict_candidates_lru_leaf_first():
    a, b = radix_keys(3), radix_keys(3, start=100)
    tree = make_tree(a)
    insert_chain(tree, b, "host")
    # only leaves can go: b is newer, so a's leaf first
    assert tree.evict_candidates("host", 1) == [a[2]]
    tree.touch(a)
    assert tree.evict_candidates("host", 1) == [b[2]]
    # evicting walks up a chain from its leaf
    for expected in (b[2], b[1], b[0], a[2]):
        got = tree.evict_candidates("host", 1)
        assert got == [expected]
        tree.remove_tier(got[0], "host")
        tree.check_integrity()


def test_evict_candidates_internal_when_held_elsewhere():
    keys = radix_keys(3)
    tree = make_tree(keys)
    tree.add_tier(keys[0], "disk")
    tree.touch(keys)
    got = tree.evict_candidates("host", 5)
    # keys[0] may go (disk holds it), keys[2] is a leaf, and keys[1] once keys[2] is gone
    assert set(got) == set(keys) and got.index(keys[2]) < got.index(keys[1])
    assert tree.evict_candidates("disk", 5) == [keys[0]]  # a leaf of nothing else: held by host
    assert tree.evict_candidates("redis", 5) == []
    assert tree.evict_candidates("host", 0) == []


def test_pin_protects_from_eviction():
    keys = radix_keys(2)
    tree = make_tree(keys)
    handles = tree.pin(keys[1:])
    assert tree.evict_candidates("host", 5) == []
    tree.check_integrity()
    tree.unpin_nodes(handles)
    assert tree.evict_candidates("host", 5) == [keys[1], keys[0]]  # tail first, then its head
    tree.pin(keys)
    tree.unpin(keys)
    tree.unpin(keys)  # extra unpins by key are ignored, never negative
    tree.check_integrity()


def test_pin_handle_survives_drop_and_reinsert():
    keys = radix_keys(2)
    tree = make_tree(keys)
    handles = tree.pin(keys)
    tree.remove_tier(keys[1], "host")
    tree.insert(keys[0], keys[1], "host", 1)
    tree.unpin_nodes(handles)  # must not touch the new node of keys[1]
    assert tree.get(keys[1]).pins == 0 and tree.get(keys[0]).pins == 0
    tree.check_integrity()


def test_pinned_internal_stub_disappears_after_unpin():
    keys = radix_keys(3)
    tree = make_tree(keys)
    handles = tree.pin(keys)
    tree.remove_tier(keys[1], "host")  # internal -> stub (pinned)
    tree.remove_tier(keys[2], "host")  # its only child goes: stub kept while pinned
    tree.check_integrity()
    tree.unpin_nodes(handles)
    tree.check_integrity()
    assert tree._stubs == set()


def test_random_operations_keep_integrity():
    rng = random.Random(7)
    prompts = [radix_keys(rng.randint(1, 12), start=rng.choice([0, 0, 50, 400])) for _ in range(30)]
    tree = PrefixTree()
    pins = []
    for step in range(600):
        op = rng.random()
        keys = rng.choice(prompts)
        if op < 0.4:
            cut = rng.randint(0, len(keys) - 1)
            parent = ROOT_KEY if cut == 0 else keys[cut - 1]
            insert_chain(tree, keys[cut:], rng.choice(["host", "disk"]), parent)
        elif op < 0.55:
            pins.append(tree.pin(keys[: tree.match(keys).length]))
        elif op < 0.7 and pins:
            tree.unpin_nodes(pins.pop(rng.randrange(len(pins))))
        elif op < 0.9:
            tier = rng.choice(["host", "disk"])
            for k in tree.evict_candidates(tier, rng.randint(1, 5)):
                tree.remove_tier(k, tier)
        else:
            tree.remove_tier(rng.choice(keys), rng.choice(["host", "disk"]))
        m = tree.match(keys)
        assert m.length == tree._walk(keys).length
        # The binary search alone agrees on chained keys, stubs and evicted middles included.
        assert tree.match_length(keys) == m.length
        part = keys[: rng.randint(0, len(keys))]
        assert tree.match_length(part) == tree.match(part).length
        if step % 20 == 0:
            tree.check_integrity()
    for handles in pins:
        tree.unpin_nodes(handles)
    tree.check_integrity()


def test_eviction_plans_take_an_old_prompt_whole_before_a_newer_tail():
    """Three prompts inserted one after another: eviction takes the oldest one tail to head
    (each parent at its own, older, place once its child is planned away) before touching
    the newer prompts; the plan, carried out in order, leaves a consistent tree."""
    a, b, c = radix_keys(4), radix_keys(4, start=100), radix_keys(4, start=200)
    tree = PrefixTree()
    for chain in (a, b, c):
        insert_chain(tree, chain, "host")
    plan = tree.evict_candidates("host", 6)
    assert plan == [a[3], a[2], a[1], a[0], b[3], b[2]]
    for key in plan:
        tree.remove_tier(key, "host")
        tree.check_integrity()
    assert tree.match(b).length == 2 and tree.match(c).length == 4
    tree.touch(b[:2])  # b's head is now the newest: c goes first
    assert tree.evict_candidates("host", 4) == [c[3], c[2], c[1], c[0]]


def test_insert_refuses_edges_that_break_the_tree():
    a, b, c = radix_keys(3)
    tree = PrefixTree()
    assert not tree.insert(a, a, "host", 1)  # its own parent
    assert not tree.insert(a, ROOT_KEY, "host", 1)  # the root as a block
    assert not tree.insert(ROOT_KEY, b"short", "host", 1)
    assert tree.insert(a, b, "host", 1)  # b under a stub for a
    assert tree.insert(b, c, "host", 1)
    assert not tree.insert(b, a, "host", 1)  # a above b and below it: a cycle
    assert not tree.insert(c, a, "host", 1)  # deeper cycle
    assert len(tree) == 2 and tree.get(a) is None
    tree.check_integrity()
    assert tree.insert(ROOT_KEY, a, "host", 1)  # the honest edge still works
    assert tree.match([a, b, c]).length == 3
    tree.check_integrity()


def test_random_hostile_edges_never_loop():
    rng = random.Random(7)
    keys = radix_keys(12)
    tree = PrefixTree()
    for _ in range(3000):
        parent = rng.choice([ROOT_KEY, *keys])
        key = rng.choice(keys)
        if rng.random() < 0.8:
            tree.insert(parent, key, rng.choice(["host", "disk"]), 1)
        else:
            tree.remove_tier(key, rng.choice(["host", "disk"]))
        tree.match(rng.sample(keys, 4))
    tree.check_integrity()
