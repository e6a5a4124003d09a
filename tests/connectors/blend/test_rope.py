from __future__ import annotations

import math

import pytest
import torch

from cacheservice.errors import BadRequest
from connectors.blend.rope import RopeSpec, apply_rope, rerotate


def rope_keys(n=7, heads=3, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, heads, d, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("layout", ["gptj", "neox"])
@pytest.mark.parametrize(("p", "q"), [(0, 5), (1, 113), (300, 2), (4000, 31000), (7, 7)])
def test_rerotate_matches_fresh_rope(layout, p, q):
    spec = RopeSpec(16, 10000.0, layout)
    raw = rope_keys()
    n = raw.shape[0]
    stored = apply_rope(raw, torch.arange(p, p + n), spec)
    moved = rerotate(stored, p, q, spec)
    fresh = apply_rope(raw, torch.arange(q, q + n), spec)
    torch.testing.assert_close(moved, fresh, rtol=1e-5, atol=1e-5)
    if p != q:  # a no-op rotation would also pass the line above
        assert not torch.allclose(stored, fresh, atol=1e-3)


@pytest.mark.parametrize("layout", ["gptj", "neox"])
def test_rerotate_per_row_and_partial_rotary(layout):
    spec = RopeSpec(16, 500.0, layout, rotary_dim=8)
    raw = rope_keys(dtype=torch.float64)
    src = torch.tensor([3, 9, 0, 50, 2, 2, 77])
    dst = torch.tensor([10, 1, 64, 5, 2, 90, 0])
    moved = rerotate(apply_rope(raw, src, spec), src, dst, spec)
    torch.testing.assert_close(moved, apply_rope(raw, dst, spec), rtol=1e-12, atol=1e-12)
    # dims past rotary_dim carry no position
    assert torch.equal(moved[..., 8:], raw[..., 8:])


def test_layouts_pair_different_dims():
    raw = rope_keys(n=1, heads=1, d=4, dtype=torch.float64)
    gptj = apply_rope(raw, 1, RopeSpec(4, 10000.0, "gptj"))[0, 0]
    neox = apply_rope(raw, 1, RopeSpec(4, 10000.0, "neox"))[0, 0]
    x = raw[0, 0]
    # frequency 0 rotates by 1 radian: gptj pairs (x0, x1), neox pairs (x0, x2)
    c, s = math.cos(1.0), math.sin(1.0)
    assert gptj[0].item() == pytest.approx(x[0].item() * c - x[1].item() * s)
    assert neox[0].item() == pytest.approx(x[0].item() * c - x[2].item() * s)


def test_gptj_matches_llama2c_formula():
    spec = RopeSpec(16, 10000.0, "gptj")
    raw = rope_keys(n=1, heads=2, d=16, dtype=torch.float64)
    pos = 37
    out = apply_rope(raw, pos, spec)
    for i in range(0, 16, 2):  # run.c: freq = 1 / 10000^(i / head_size) on pair (i, i+1)
        ang = pos / 10000.0 ** (i / 16)
        a, b = raw[0, :, i], raw[0, :, i + 1]
        torch.testing.assert_close(out[0, :, i], a * math.cos(ang) - b * math.sin(ang))
        torch.testing.assert_close(out[0, :, i + 1], a * math.sin(ang) + b * math.cos(ang))


def test_rerotate_keeps_norms_and_input():
    spec = RopeSpec(16, 10000.0, "neox")
    k = rope_keys()
    before = k.clone()
    moved = rerotate(k, 0, 1000, spec)
    assert torch.equal(k, before)
    torch.testing.assert_close(moved.norm(dim=-1), k.norm(dim=-1))


def test_bad_specs_and_shapes():
    with pytest.raises(BadRequest, match="layout"):
        RopeSpec(16, layout="glm")
    with pytest.raises(BadRequest, match="rotary_dim"):
        RopeSpec(16, rotary_dim=7)
    with pytest.raises(BadRequest, match="expected"):
        apply_rope(torch.zeros(3, 16), 0, RopeSpec(16))
    with pytest.raises(BadRequest, match="positions"):
        apply_rope(torch.zeros(3, 1, 16), torch.arange(2), RopeSpec(16))
