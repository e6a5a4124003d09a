"""/v1/plan and /v1/plan/batch on a real service whose cache the test sets up."""

from __future__ import annotations

import numpy as np
import pytest

from cacheservice.errors import BadRequest, UnknownNamespace
from index.hashing import chunk_block_keys, chunk_key, prefix_keys
from index.planner import DROPPABLE, MOVABLE, Segment
from tests.factories import BLOCK_BYTES, make_namespace


def toks(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n).astype(np.uint32)


SYS, A, B, C, Q = toks(40, 1), toks(70, 2), toks(50, 3), toks(60, 4), toks(20, 5)


def store_prefix(client, ns, *parts) -> int:
    keys = prefix_keys(np.concatenate(parts), ns.seed, ns.block_tokens)
    return client.put_blocks(ns.id, keys, b"\x05" * (len(keys) * BLOCK_BYTES))


def store_chunk(client, ns, tokens) -> None:
    keys = chunk_block_keys(tokens, ns.seed, ns.block_tokens)
    data = b"\x06" * (len(keys) * BLOCK_BYTES)
    assert client.register_chunk(ns.id, chunk_key(tokens, ns.seed), len(tokens), 0, keys, data)


def test_plan_follows_what_the_service_holds(client) -> None:
    ns = make_namespace()
    client.register(ns, BLOCK_BYTES)
    assert store_prefix(client, ns, SYS, B, A) == (40 + 50 + 70) // 16
    store_chunk(client, ns, C)
    segments = [Segment.of(SYS), Segment.of(A, MOVABLE), Segment.of(C, MOVABLE),
                Segment.of(B, MOVABLE), Segment.of(A.copy(), DROPPABLE), Segment.of(Q)]  # fmt: skip
    p = client.plan(ns.id, segments)
    assert p.order == [0, 3, 1, 2, 5] and p.dropped == [4]
    by = {s.index: s for s in p.segments}
    assert [by[i].source for i in (0, 3, 1, 2, 5)] == ["prefix", "prefix", "prefix", "chunk",
                                                       "compute"]  # fmt: skip
    assert p.prefix_tokens == 160 and p.chunk_tokens == 60 and p.num_tokens == 240
    # Nothing may move: the caller's order, whatever is cached.
    fixed = [Segment.of(SYS), Segment.of(A), Segment.of(B), Segment.of(Q)]
    assert client.plan(ns.id, fixed).order == [0, 1, 2, 3]


def test_batch_plan_groups_requests_sharing_documents(client) -> None:
    ns = make_namespace()
    client.register(ns, BLOCK_BYTES)
    shared = toks(64, 9)
    reqs = [
        [Segment.of(SYS), Segment.of(toks(64, 10), MOVABLE), Segment.of(shared, MOVABLE),
         Segment.of(toks(8, 11))],
        [Segment.of(SYS), Segment.of(toks(64, 12), MOVABLE), Segment.of(toks(8, 13))],
        [Segment.of(SYS), Segment.of(shared, MOVABLE), Segment.of(toks(8, 14))],
    ]  # fmt: skip
    b = client.plan_batch(ns.id, reqs)
    assert b.plans[0].order == [0, 2, 1, 3]
    assert sorted(b.order) == [0, 1, 2] and [0, 2] in [sorted(g) for g in b.groups]


def test_plan_requests_are_validated(client) -> None:
    ns = make_namespace()
    client.register(ns, BLOCK_BYTES)
    with pytest.raises(UnknownNamespace):
        client.plan("0" * 16, [Segment.of(SYS)])
    cases = [
        {"tokens": b"\0" * 8, "lengths": [1], "kinds": "f"},  # lengths do not add up
        {"tokens": b"\0" * 4, "lengths": [1], "kinds": "fm"},
        {"tokens": b"\0" * 4, "lengths": [1], "kinds": "x"},
        {"tokens": b"\0" * 4, "lengths": [-1], "kinds": "f"},
        {"tokens": b"\0" * 3, "lengths": [1], "kinds": "f"},
        {"tokens": b"\0" * 4, "lengths": [1], "kinds": "f", "ranks": ["a"]},
        {"tokens": b"\0" * 4, "lengths": "1", "kinds": "f"},
    ]
    from cacheservice.calls import Call, _plan

    for body in cases:
        with pytest.raises(BadRequest):
            client._do(Call("POST", "/v1/plan", {"ns": ns.id, **body}, _plan))
    listed = {n["id"]: n for n in client.namespaces()}
    assert listed[ns.id]["model"] == ns.model and listed[ns.id]["block_bytes"] == BLOCK_BYTES
