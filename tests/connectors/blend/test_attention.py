"""The blend attention against torch's own SDPA on the same masks: causal full rows, a sorted
subset of rows (what top-r% recomputes), an arbitrary mask, half precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from connectors.blend.attention import ROWS, gqa_attention


def reference(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(rep, dim=1).transpose(0, 1) for x in (k, v))
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).double(), k.double(), v.double(), attn_mask=mask[None], scale=scale
    )
    return out.transpose(0, 1)


def tensors(tq: int, tk: int, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, 6, 16, generator=g).to(dtype)
    k, v = (torch.randn(tk, 2, 16, generator=g).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("tk", [1, ROWS - 1, ROWS + 3, 3 * ROWS + 17])
def test_causal_rows_match_sdpa(tk: int):
    q, k, v = tensors(tk, tk)
    pos = torch.arange(tk)
    mask = pos[None, :] <= pos[:, None]
    got = gqa_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(got.double(), reference(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)


def test_a_selected_subset_and_an_arbitrary_mask_match_sdpa():
    tk = 2 * ROWS + 50
    q, k, v = tensors(tk, tk, seed=1)
    rows = torch.sort(torch.randperm(tk, generator=torch.Generator().manual_seed(2))[:90]).values
    pos = torch.arange(tk)
    mask = pos[None, :] <= rows[:, None]
    got = gqa_attention(q[rows], k, v, mask, 0.25)
    torch.testing.assert_close(got.double(), reference(q[rows], k, v, mask, 0.25),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    holes = torch.rand(tk, tk, generator=torch.Generator().manual_seed(3)) < 0.5
    holes[:, 0] = True  # every row may see at least one key
    got = gqa_attention(q, k, v, holes, 0.25)
    torch.testing.assert_close(got.double(), reference(q, k, v, holes, 0.25), rtol=1e-5, atol=1e-5)


def test_half_precision_softmax_runs_in_float32():
    q, k, v = tensors(ROWS + 9, ROWS + 9, torch.bfloat16, seed=4)
    pos = torch.arange(q.shape[0])
    mask = pos[None, :] <= pos[:, None]
    got = gqa_attention(q, k, v, mask, 0.25)
    assert got.dtype == torch.bfloat16
    err = (got.double() - reference(q, k, v, mask, 0.25)).abs().max()
    assert err < 0.03, err
