"""Eviction as writers meet it, against a real service process with a host tier only: a
prompt stored into a full arena never evicts its own head (the blocks its tail chains from),
a write that no prefix lookup could reach evicts nothing, and a replayed production trace
keeps the hit rate the prefix tree's own LRU replay predicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from index.hashing import ROOT_KEY
from tests.factories import BLOCK_BYTES, make_namespace, make_payloads, make_prefix_keys
from tests.processes import SLOT_BYTES

TRACE = Path(__file__).resolve().parents[1] / "assets" / "data" / "mooncake_synthetic_trace.jsonl"
ARENA_SLOTS = 128


def no_disk(slots: int) -> list[str]:
    return ["--arena-bytes", str(slots * SLOT_BYTES), "--disk-dir", ""]


def store(client, ns_id: str, keys, payloads, step: int, how: str, parent=ROOT_KEY) -> None:
    """Store ``keys`` ``step`` blocks per call, each call chained from the last key sent."""
    for i in range(0, len(keys), step):
        part = keys[i : i + step]
        if how == "put":
            client.put_blocks(ns_id, part, b"".join(payloads[i : i + step]), parent=parent)
        else:
            r = client.reserve(ns_id, part, parent=parent)
            if r.lease:
                client.commit(r.lease)
        parent = part[-1]


@pytest.mark.parametrize("how", ["put", "reserve"])
@pytest.mark.parametrize("step", [1, 16])
def test_a_new_prompt_never_evicts_its_own_head(make_service, how: str, step: int) -> None:
    svc = make_service(extra=no_disk(ARENA_SLOTS))
    with svc.client() as c:
        ns = make_namespace()
        c.register(ns, BLOCK_BYTES)
        a = make_prefix_keys(ns, ARENA_SLOTS // 2, seed=1)
        b = make_prefix_keys(ns, ARENA_SLOTS, seed=2)
        c.put_blocks(ns.id, a, b"".join(make_payloads(len(a), seed=1)))
        reader = c.acquire(ns.id, a)  # a reader pins A: only B's own blocks could make room
        assert len(reader.slots) == len(a)
        store(c, ns.id, b, make_payloads(len(b), seed=2), step, how)
        # B keeps the head that fits; what did not fit was refused, nothing of B was evicted.
        assert c.lookup(ns.id, b).hits == ARENA_SLOTS - len(a)
        assert c.lookup(ns.id, a).hits == len(a)
        assert c.stats()["evictions"] == 0
        c.release(reader.lease)
        # A is older and unpinned now: a newer prompt evicts A, still never its own head.
        d = make_prefix_keys(ns, ARENA_SLOTS - len(a), seed=3)
        store(c, ns.id, d, make_payloads(len(d), seed=3), step, how)
        assert c.lookup(ns.id, d).hits == len(d)
        assert c.lookup(ns.id, a).hits < len(a)


@pytest.mark.parametrize("how", ["put", "reserve"])
def test_a_write_after_a_gap_evicts_nothing(make_service, how: str) -> None:
    """A writer that missed block i still sends i+1...: those blocks hang off no stored
    parent, no prefix lookup reaches them, so they may fill free slots but evict nothing."""
    svc = make_service(extra=no_disk(ARENA_SLOTS))
    with svc.client() as c:
        ns = make_namespace()
        c.register(ns, BLOCK_BYTES)
        full = make_prefix_keys(ns, ARENA_SLOTS, seed=4)
        payloads = make_payloads(ARENA_SLOTS, seed=4)
        store(c, ns.id, full, payloads, 16, how)  # the arena is full of one prompt
        assert c.lookup(ns.id, full).hits == ARENA_SLOTS
        tail = make_prefix_keys(ns, 32, seed=5)
        missing = make_prefix_keys(ns, 1, seed=6)[0]  # the block the writer failed to store
        store(c, ns.id, tail, payloads[:32], 8, how, parent=missing)
        assert c.lookup(ns.id, full).hits == ARENA_SLOTS
        assert c.stats()["evictions"] == 0
        assert c.exists(ns.id, tail) == 0


def test_a_chunk_chain_reserved_into_a_full_arena_evicts_older_blocks(make_service) -> None:
    """A chunk's blocks chain from its chunk key, which no prefix tree holds: reserved with
    ``chunk=True`` they may evict older unpinned blocks (a chunk registered afterwards is
    reachable through the chunk index); the same chain without the flag evicts nothing."""
    from index.hashing import chunk_block_keys, chunk_key

    svc = make_service(extra=no_disk(ARENA_SLOTS))
    with svc.client() as c:
        ns = make_namespace()
        seed = c.register(ns, BLOCK_BYTES).seed
        old = make_prefix_keys(ns, ARENA_SLOTS, seed=7)
        store(c, ns.id, old, make_payloads(ARENA_SLOTS, seed=7), 16, "reserve")
        tokens = list(range(1000, 1000 + 16 * 8))
        key, keys = chunk_key(tokens, seed), chunk_block_keys(tokens, seed, 16)
        assert c.reserve(ns.id, keys, parent=key).lease == "", "no flag: a gap, no eviction"
        r = c.reserve(ns.id, keys, parent=key, chunk=True)
        assert r.lease and all(s is not None for s in r.slots)
        assert c.commit(r.lease) == len(keys)
        assert c.register_chunk(ns.id, key, len(tokens), 3, keys)
        (entry,) = c.lookup_chunks(ns.id, [key])
        assert entry is not None and entry.keys == keys and entry.resident
        assert c.stats()["evictions"] == len(keys)
        with pytest.raises(Exception, match="chunk's key"):
            c.reserve(ns.id, keys, parent=ROOT_KEY, chunk=True)


def load_trace(path: Path) -> list[list[bytes]]:
    with path.open() as f:
        ids = [json.loads(line)["hash_ids"] for line in f]
    # hash_ids are chained to the prefix already: a 16-byte key per id keeps that chaining.
    return [[(int(h) + 1).to_bytes(16, "little") for h in req] for req in ids]


def tree_replay(requests: list[list[bytes]], capacity: int) -> float:
    """The prediction: the prefix tree's LRU with eviction after each request's insert."""
    from index.radix import PrefixTree

    tree, hits, total = PrefixTree(), 0, 0
    for keys in requests:
        matched = tree.match(keys).length
        hits, total = hits + matched, total + len(keys)
        tree.touch(keys[:matched])
        parent = keys[matched - 1] if matched else ROOT_KEY
        for key in keys[matched:]:
            tree.insert(parent, key, "host", 1)
            parent = key
        while (excess := tree.blocks_in("host") - capacity) > 0:
            for key in tree.evict_candidates("host", excess):
                tree.remove_tier(key, "host")
    return hits / total


def test_a_replayed_trace_hits_as_the_tree_replay_predicts(make_service) -> None:
    """The Mooncake synthetic trace (3,993 requests) through the service as an engine drives
    it: acquire the hit (which refreshes its LRU place), release, store the rest chained from
    it. The service evicts before each write and keeps the writer's chain; the tree replay
    evicts after each request. Margin: 1.5 points of block hit rate."""
    requests = load_trace(TRACE)
    unique = len({k for keys in requests for k in keys})
    capacity = unique // 10
    block = 64
    svc = make_service(extra=no_disk(capacity))
    hits = total = 0
    with svc.client() as c:
        ns = make_namespace()
        c.register(ns, block)
        data = bytes(block) * max(map(len, requests))
        for keys in requests:
            got = c.acquire(ns.id, keys)
            n = len(got.slots)
            hits, total = hits + n, total + len(keys)
            if got.lease:
                c.release(got.lease)
            rest = keys[n:]
            if rest:
                parent = keys[n - 1] if n else ROOT_KEY
                c.put_blocks(ns.id, rest, data[: block * len(rest)], parent=parent)
        stats = c.stats()
    served, predicted = hits / total, tree_replay(requests, capacity)
    print(f"trace hit rate: service {served:.2%}, tree replay {predicted:.2%} "
          f"(capacity {capacity} of {unique} blocks)")  # fmt: skip
    assert stats["blocks"]["host"] <= capacity
    assert stats["corrupt"] == 0 and stats["refused"] == 0
    assert abs(served - predicted) <= 0.015, (served, predicted)
    assert served > 0.2, "a tenth of the trace's blocks holds over a fifth of its hits"
