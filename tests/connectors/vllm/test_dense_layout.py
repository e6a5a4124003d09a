"""GPU backends' KV layouts, on CPU tensors built in each layout: per-token reads and writes
land where the backend's kernels look (an element-by-element reference, independent of the
decoder), for every axis order and for physical stride orders under one logical view."""

from __future__ import annotations

import itertools

import pytest
import torch

from cacheservice.errors import BadRequest
from connectors.vllm.dense_layout import (
    FLASH_ATTN_LEGACY,
    FLASHINFER_HND,
    FLASHINFER_NHD,
    VLLM_LAYER_VIEW,
    DenseLayout,
)
from connectors.vllm.kv_layout import TokenKV

# Deliberately equal sizes: the decoder must follow the declared axes, never sizes.
BLOCKS, BLOCK, HEADS, DIM = 4, 4, 4, 8


def element(layer: torch.Tensor, axes: str, kv: int, b: int, n: int, h: int, j: int):
    """Index of one element as the backend's kernel addresses it (the reference)."""
    at = {"b": b, "n": n, "h": h, "k": kv, "d": j, "c": kv * DIM + j}
    return tuple(at[a] for a in axes)


def make_layer(axes: str, physical: str | None) -> torch.Tensor:
    """A zero cache in ``axes`` logical order, stored in ``physical`` order (a strided view)."""
    layout = DenseLayout(axes, HEADS, BLOCK, DIM)
    shape = dict(zip(axes, layout.sizes(BLOCKS), strict=True))
    order = physical or axes
    storage = torch.zeros([shape[a] for a in order], dtype=torch.float32)
    return storage.permute(*(order.index(a) for a in axes))


CASES = [
    (VLLM_LAYER_VIEW, None),  # vLLM 0.32 [B, H, N, C], HND contiguous
    (VLLM_LAYER_VIEW, "bnhc"),  # the same logical view over NHD storage
    (VLLM_LAYER_VIEW, "hbnc"),  # layer-interleaved orders keep the logical view too
    (FLASH_ATTN_LEGACY, None),  # [2, B, N, H, D]
    (FLASHINFER_NHD, None),  # [B, 2, N, H, D]
    (FLASHINFER_HND, None),  # [B, 2, H, N, D]
]


@pytest.mark.parametrize(("axes", "physical"), CASES)
def test_reads_and_writes_land_where_the_kernel_looks(axes: str, physical: str | None):
    layout = DenseLayout(axes, HEADS, BLOCK, DIM)
    layer = make_layer(axes, physical)
    block_ids = torch.tensor([2, 0, 3])  # the request's blocks, out of order
    positions = torch.tensor([0, 3, 4, 6, 9, 11])
    gen = torch.Generator().manual_seed(len(axes))
    k, v = torch.randn(2, 6, HEADS, DIM, generator=gen).unbind(0)
    want = TokenKV(k, v)
    for i, p in enumerate(positions.tolist()):  # the kernel's view of each token
        b, n = int(block_ids[p // BLOCK]), p % BLOCK
        for h, j in itertools.product(range(HEADS), range(DIM)):
            layer[element(layer, axes, 0, b, n, h, j)] = want.k[i, h, j]
            layer[element(layer, axes, 1, b, n, h, j)] = want.v[i, h, j]
    got = layout.read(layer, block_ids, positions)
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)

    back = make_layer(axes, physical)
    layout.write(back, block_ids, positions, want)
    assert torch.equal(back, layer), "a write puts every element where the reference did"
    assert int((back != 0).sum()) == 2 * want.k.numel(), "nothing else written"


def test_a_layout_is_declared_not_guessed():
    with pytest.raises(BadRequest, match="must name"):
        DenseLayout("bnhd", HEADS, BLOCK, DIM)  # neither k nor c
    with pytest.raises(BadRequest, match="must name"):
        DenseLayout("bbnhc", HEADS, BLOCK, DIM)
    layout = DenseLayout(FLASHINFER_NHD, HEADS, BLOCK, DIM)
    with pytest.raises(BadRequest, match="declare the backend"):
        layout.read(make_layer(FLASH_ATTN_LEGACY, None), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(BadRequest, match="past the request"):
        layout.read(make_layer(FLASHINFER_NHD, None), torch.tensor([0]), torch.tensor([BLOCK]))
    with pytest.raises(BadRequest, match="must be"):
        bad = TokenKV(torch.zeros(1, HEADS, DIM + 1), torch.zeros(1, HEADS, DIM + 1))
        layout.write(make_layer(FLASHINFER_NHD, None), torch.tensor([0]), torch.tensor([0]), bad)


def test_vllm_builds_the_view_the_decoder_reads():
    """vLLM's own view construction (create_kv_cache_views) for its NHD and HND layouts gives
    the logical [B, H, N, C] view; FlashAttention's own split of it (transpose(1, 2), split at
    head_size) sees the keys and values the decoder wrote."""
    kvi = pytest.importorskip("vllm.v1.kv_cache_interface")
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = kvi.FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM,
                                 dtype=torch.float32)  # fmt: skip
    for kind in (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC):
        page = spec.page_size_bytes
        raw = torch.zeros(BLOCKS * page, dtype=torch.int8)
        tensor = kvi.KVCacheTensor(size=BLOCKS * page, layers=["l0"],
                                   layer_stride=BLOCKS * page, block_stride=page)  # fmt: skip
        (layer,) = kvi.create_kv_cache_views(raw, spec, BLOCKS, kind, tensor)
        assert tuple(layer.shape) == (BLOCKS, HEADS, BLOCK, 2 * DIM)
        layout = DenseLayout(VLLM_LAYER_VIEW, HEADS, BLOCK, DIM)
        kv = TokenKV(torch.randn(3, HEADS, DIM), torch.randn(3, HEADS, DIM))
        layout.write(layer, torch.tensor([1, 3]), torch.tensor([1, 2, 5]), kv)
        key_cache, value_cache = layer.transpose(1, 2).split(DIM, dim=-1)  # [B, N, H, D]
        assert torch.equal(key_cache[1, 1], kv.k[0]) and torch.equal(value_cache[3, 1], kv.v[2])
