from __future__ import annotations

import pytest
import torch

from cacheservice.errors import BadRequest
from connectors.blend.chunking import Chunk, from_separators, from_spans, segments
from connectors.blend.recompute import ChunkKV
from index.hashing import chunk_key

SEED = 1234
SEP = 13


def make_chunk_kv(tokens: list[int], start_pos: int = 1) -> ChunkKV:
    n = len(tokens)
    z = [torch.zeros(n, 2, 4)]
    return ChunkKV(torch.tensor(tokens), start_pos, z, z)


def test_declared_spans_get_position_independent_keys():
    doc = [70, 71, 72, 73]
    a = [1, 5, *doc, 6, 7]
    b = [1, 9, 9, 9, *doc, 8]
    ca = from_spans(a, [(2, 6)], SEED)
    cb = from_spans(torch.tensor(b), [(4, 8)], SEED)
    assert ca == [Chunk(2, 6, chunk_key(doc, SEED))]
    assert ca[0].key == cb[0].key and ca[0].num_tokens == 4
    assert from_spans(a, [(2, 6)], SEED + 1)[0].key != ca[0].key


def test_short_spans_stay_fresh():
    assert from_spans([1, 2, 3, 4], [(0, 1), (1, 4)], SEED, min_tokens=2) == [
        Chunk(1, 4, chunk_key([2, 3, 4], SEED))
    ]


@pytest.mark.parametrize("spans", [[(3, 2)], [(0, 9)], [(0, 3), (2, 4)], [(2, 4), (0, 1)]])
def test_bad_spans_are_rejected(spans):
    with pytest.raises(BadRequest, match="span"):
        from_spans([1, 2, 3, 4, 5], spans, SEED)


def test_separators_split_documents_and_fence_the_question():
    toks = [1, 20, 21, SEP, 30, 31, 32, SEP, SEP, 40, SEP, 50, 51]
    got = from_separators(toks, {SEP}, SEED, start=1, end=10)
    assert [(c.start, c.end) for c in got] == [(1, 3), (4, 7), (9, 10)]
    assert got[1].key == chunk_key([30, 31, 32], SEED)
    assert [(c.start, c.end) for c in from_separators(toks, [SEP], SEED, 1, 10, 2)] == [
        (1, 3),
        (4, 7),
    ]
    with pytest.raises(BadRequest, match="separator"):
        from_separators(toks, [], SEED)
    with pytest.raises(BadRequest, match="outside"):
        from_separators(toks, [SEP], SEED, start=5, end=99)


def test_segments_keep_misses_fresh():
    toks = [1, 20, 21, SEP, 30, 31, SEP, 40, 41]
    chunks = from_separators(toks, {SEP}, SEED, start=1, end=6)
    hit = make_chunk_kv([30, 31])
    segs = segments(toks, chunks, {chunks[1].key: hit})
    assert [s.tokens.tolist() for s in segs] == [[1, 20, 21, SEP], [30, 31], [SEP, 40, 41]]
    assert [s.cached is hit for s in segs] == [False, True, False]
    assert torch.equal(torch.cat([s.tokens for s in segs]), torch.tensor(toks))
