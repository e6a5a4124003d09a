"""The planner over a stored-key set: prefix hits steer the order, the rest keeps relevance."""

from __future__ import annotations

import time

import numpy as np

from index.hashing import chunk_key, prefix_keys
from index.planner import DROPPABLE, MOVABLE, Segment, plan, plan_batch

SEED, BT = 99, 4


def toks(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n).astype(np.uint32)


SYS, A, B, C, Q = toks(6, 1), toks(9, 2), toks(7, 3), toks(10, 4), toks(5, 5)


def stored_for(*parts: np.ndarray) -> set[bytes]:
    return set(prefix_keys(np.concatenate(parts), SEED, BT))


def no_chunks(_: bytes) -> bool:
    return False


def seg(tokens, kind=MOVABLE, rank=None) -> Segment:
    return Segment.of(tokens, kind, rank)


def test_the_cached_order_is_found_even_when_segments_straddle_blocks() -> None:
    stored = stored_for(SYS, B, A)  # cached: system, B, A (6+7+9 tokens: unaligned to 4)
    p = plan([Segment.of(SYS), seg(A), seg(B), seg(C), Segment.of(Q)], stored, no_chunks, SEED, BT)
    assert p.order == [0, 2, 1, 3, 4]
    assert p.prefix_tokens == (6 + 7 + 9) // BT * BT == 20
    sources = {s.index: s.source for s in p.segments}
    assert sources[0] == "prefix" and sources[2] == "prefix" and sources[3] == "compute"
    assert [s.start for s in p.segments] == [0, 6, 13, 22, 32] and p.num_tokens == 37


def test_nothing_cached_keeps_the_callers_relevance_order_and_fixed_segments_stay() -> None:
    segments = [Segment.of(SYS), seg(A, rank=2), seg(B, rank=0), seg(C, rank=1), Segment.of(Q)]
    p = plan(segments, set(), no_chunks, SEED, BT)
    assert p.order == [0, 2, 3, 1, 4] and p.prefix_tokens == 0
    # a fixed segment between movable ones is a barrier: nothing crosses it
    segments = [seg(A), Segment.of(SYS), seg(B), seg(C)]
    p = plan(segments, stored_for(SYS, C), no_chunks, SEED, BT)
    assert p.order.index(1) == 1 and set(p.order[2:]) == {2, 3}


def test_duplicates_are_dropped_chunks_labelled_and_a_miss_stops_the_prefix() -> None:
    chunks = {chunk_key(C, SEED)}
    segments = [Segment.of(SYS), seg(A), seg(C), seg(A.copy(), DROPPABLE), Segment.of(Q)]
    p = plan(segments, stored_for(SYS), chunks.__contains__, SEED, BT)
    assert p.dropped == [3] and 3 not in p.order
    by = {s.index: s for s in p.segments}
    assert by[2].source == "chunk" and by[2].cached_tokens == 10 and p.chunk_tokens == 10
    assert by[1].source == "compute" and p.prefix_tokens == 4  # SYS's first full block only


def test_batch_puts_shared_documents_first_and_sharing_requests_together() -> None:
    shared, other = toks(8, 10), toks(8, 11)
    reqs = [
        [Segment.of(SYS), seg(other), seg(shared), Segment.of(toks(3, 20))],
        [Segment.of(SYS), seg(toks(8, 12)), Segment.of(toks(3, 21))],
        [Segment.of(SYS), seg(shared), seg(toks(8, 13)), Segment.of(toks(3, 22))],
    ]
    b = plan_batch(reqs, set(), no_chunks, SEED, BT)
    assert b.plans[0].order == [0, 2, 1, 3], "the shared document goes first"
    assert b.plans[2].order == [0, 1, 2, 3]
    assert b.order[:2] in ([0, 2], [2, 0]) and [0, 2] in [sorted(g) for g in b.groups]
    assert sorted(b.order) == [0, 1, 2]


def test_32_segments_plan_in_well_under_a_millisecond_each() -> None:
    docs = [toks(200, 100 + i) for i in range(30)]
    bt = 16  # vLLM's default block size
    stored = set(prefix_keys(np.concatenate([SYS, *docs[:10]]), SEED, bt))
    segments = [Segment.of(SYS)] + [seg(d, rank=i) for i, d in enumerate(reversed(docs))]
    segments.append(Segment.of(Q))
    p = plan(segments, stored, no_chunks, SEED, bt)
    assert p.order[1:11] == list(range(30, 20, -1)), "the cached ten first, in cached order"
    start = time.perf_counter()
    for _ in range(20):
        plan(segments, stored, no_chunks, SEED, bt)
    per_plan = (time.perf_counter() - start) / 20
    assert per_plan < 0.02, f"{per_plan * 1e3:.2f} ms per plan"  # generous: a noisy 2-core VM
    print(f"32 segments (6.0K tokens), ten cached: {per_plan * 1e3:.3f} ms per plan")


def test_the_deepest_stored_order_wins_over_a_tie_at_the_first_step() -> None:
    # Two stored orders start alike; only the second goes on into C. A one-step greedy choice
    # ties between A and B at the first step; the search follows both and keeps the deeper.
    stored = stored_for(SYS, A, B) | stored_for(SYS, B, A, C)
    p = plan([Segment.of(SYS), seg(A), seg(B), seg(C), Segment.of(Q)], stored, no_chunks, SEED, BT)
    assert p.order == [0, 2, 1, 3, 4]
    assert p.prefix_tokens == (6 + 7 + 9 + 10) // BT * BT


def test_a_hostile_request_of_identical_documents_stays_bounded() -> None:
    same = toks(64, 7)
    stored = stored_for(SYS, *[same] * 20)
    segments = [Segment.of(SYS)] + [seg(same.copy()) for _ in range(20)]
    start = time.perf_counter()
    p = plan(segments, stored, no_chunks, SEED, BT)
    assert time.perf_counter() - start < 2.0, "the search must be bounded"
    assert sorted(p.order) == list(range(21)) and p.prefix_tokens > 0
