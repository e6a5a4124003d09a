from __future__ import annotations

import math

import pytest
import torch

from cacheservice.errors import BadRequest
from connectors.blend.base import forward
from connectors.blend.recompute import (
    ChunkKV,
    FirstK,
    NoRecompute,
    Segment,
    TopRatio,
    blend_prefill,
    encode_chunk,
)
from tests.connectors.blend.prompts import make_rag_prompt


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def full_of(model, segments):
    return forward(model, torch.cat([s.tokens for s in segments]))


def test_recompute_everything_equals_full_prefill(tiny, musique):
    model, _ = tiny
    segs = make_rag_prompt(tiny, musique[0], [2, 0, 1])
    full = full_of(model, segs)
    res = blend_prefill(model, segs, FirstK(10_000))
    assert res.recompute_fraction == 1.0 and bool(res.recomputed.all())
    torch.testing.assert_close(res.logits, full.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(res.kv.values, full.kv.values, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunk_at_its_canonical_position_is_exact_without_recompute(tiny, musique):
    model, _ = tiny
    segs = make_rag_prompt(tiny, musique[1], [0])  # BOS + chunk (as cached) + question
    full = full_of(model, segs)
    res = blend_prefill(model, segs, NoRecompute())
    assert res.recompute_fraction == 0.0
    nq = segs[-1].tokens.shape[0]
    assert res.logits.shape[0] == nq + 1  # BOS and the question were computed
    torch.testing.assert_close(res.logits[-nq:], full.logits[-nq:], rtol=1e-4, atol=1e-4)


def test_moved_chunk_keys_equal_fresh_keys_at_first_layer(tiny, musique):
    model, _ = tiny
    segs = make_rag_prompt(tiny, musique[2], [1, 0, 2])
    full = full_of(model, segs)
    res = blend_prefill(model, segs, NoRecompute())
    # layer-0 K depends only on token and position: re-rotation must reproduce it exactly
    torch.testing.assert_close(res.kv.keys[0], full.kv.keys[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.kv.values[0], full.kv.values[0], rtol=1e-5, atol=1e-5)
    # deeper layers of a moved chunk differ (no cross-chunk attention): something to restore
    b = 1 + segs[1].tokens.shape[0]
    assert not torch.allclose(res.kv.values[3][b:], full.kv.values[3][b:], atol=1e-3)


def test_selective_recompute_is_closer_to_full_than_plain_reuse(tiny, musique):
    model, _ = tiny
    scores = {"none": [], "first_k": [], "top_r": []}
    policies = {"none": NoRecompute(), "first_k": FirstK(4), "top_r": TopRatio(0.15)}
    for i, order in enumerate([[2, 0, 1], [1, 2, 0], [2, 1, 0], [1, 0, 2]] * 2):
        segs = make_rag_prompt(tiny, musique[i], order)
        full = full_of(model, segs)
        nq = segs[-1].tokens.shape[0]
        for name, pol in policies.items():
            res = blend_prefill(model, segs, pol)
            scores[name].append(kl(full.logits[-nq:], res.logits[-nq:]))
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    assert mean["none"] > 0
    assert mean["first_k"] < 0.95 * mean["none"], mean
    assert mean["top_r"] < 0.6 * mean["none"], mean


def test_recompute_fractions(tiny, musique):
    model, _ = tiny
    segs = make_rag_prompt(tiny, musique[3], [0, 1, 2])
    n_chunk = sum(s.tokens.shape[0] for s in segs if s.cached is not None)
    fk = blend_prefill(model, segs, FirstK(4))
    assert fk.recompute_fraction == pytest.approx(12 / n_chunk)
    assert fk.layer_fraction == pytest.approx(12 / n_chunk)
    top = blend_prefill(model, segs, TopRatio(0.15, select_layer=1))
    r = math.ceil(0.15 * n_chunk) / n_chunk
    assert top.recompute_fraction == pytest.approx(r)
    assert top.layer_fraction == pytest.approx((2 + 2 * r) / 4)
    fresh = torch.cat([torch.full((s.tokens.shape[0],), s.cached is None) for s in segs])
    assert bool(top.recomputed[fresh].all())
    assert torch.equal(top.rows, top.recomputed.nonzero().squeeze(1))


@pytest.mark.parametrize("policy", [FirstK(4), TopRatio(0.15, select_layer=1)])
def test_kv_only_blend_skips_the_logits_and_keeps_the_kv(tiny, musique, policy):
    """What an engine asks for (logits=False): the same KV, bit for bit, and no logits."""
    model, _ = tiny
    segs = make_rag_prompt(tiny, musique[3], [0, 1, 2])
    full, kv_only = (
        blend_prefill(model, segs, policy),
        blend_prefill(model, segs, policy, logits=False),
    )
    assert kv_only.logits is None and full.logits is not None
    assert torch.equal(kv_only.recomputed, full.recomputed)
    for a, b in zip(
        full.kv.keys + full.kv.values, kv_only.kv.keys + kv_only.kv.values, strict=True
    ):
        assert torch.equal(a, b)
    with pytest.raises(AssertionError, match="no logits"):
        _ = kv_only.last_logits


def test_prompt_without_cached_chunks_is_a_plain_prefill(tiny):
    model, _ = tiny
    toks = torch.tensor([1, 40, 41, 42])
    res = blend_prefill(model, [Segment(toks)], TopRatio(0.5))
    torch.testing.assert_close(res.logits, forward(model, toks).logits)
    assert res.recompute_fraction == 0.0


def test_bad_prompts_are_rejected(tiny):
    model, _ = tiny
    chunk = torch.tensor([60, 61, 62])
    kv = encode_chunk(model, chunk, torch.tensor([1]))
    with pytest.raises(BadRequest, match="fresh segment"):
        blend_prefill(model, [Segment(torch.tensor([1])), Segment(chunk, kv)], NoRecompute())
    with pytest.raises(BadRequest, match="different tokens"):
        Segment(torch.tensor([60, 61, 63]), kv)
    segs = [Segment(torch.tensor([1])), Segment(chunk, kv), Segment(torch.tensor([5]))]
    with pytest.raises(BadRequest, match="select_layer"):
        blend_prefill(model, segs, TopRatio(0.2, select_layer=4))
    with pytest.raises(BadRequest, match="ratio"):
        TopRatio(1.5)


def test_chunk_kv_stored_in_the_engines_bf16_blends_like_float32(tiny, musique):
    # A bf16 engine stores its chunks' KV in bf16; the recompute runs in the model's float32.
    model, _ = tiny
    segs = make_rag_prompt(tiny, musique[3], [1, 0])
    half = [
        Segment(s.tokens, None if s.cached is None else ChunkKV(
            s.cached.tokens, s.cached.start_pos, [k.bfloat16() for k in s.cached.keys],
            [v.bfloat16() for v in s.cached.values]))
        for s in segs
    ]  # fmt: skip
    exact = blend_prefill(model, segs, TopRatio(0.15, select_layer=1))
    res = blend_prefill(model, half, TopRatio(0.15, select_layer=1))
    assert res.kv.keys[0].dtype == torch.float32
    assert kl(exact.logits[-1:], res.logits[-1:]) < 1e-2
