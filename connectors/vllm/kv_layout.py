"""Per-token K/V in vLLM's CPU paged KV cache: where each token's key and value live.

A CPU attention layer's cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``;
viewed as ``[num_blocks, num_kv_heads, 2 * block_size, head_size]`` its first half along dim 2
is the key cache and the second the value cache. Inside a block the attention kernel arranges
elements for its instruction set (the ``vec`` kernel stores each head's keys transposed,
head_size-major, and values token-major; other ISAs tile differently). Rather than restate a
kernel's tiling, ``probe`` writes index-coded tokens through vLLM's own cache-write op into a
one-block scratch cache and reads back where every (token, head, dim) element landed. The
result is a permutation of a block's elements (checked), so per-token reads and writes are a
gather and a scatter. Keys are stored as the model computed them, RoPE already applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from cacheservice.errors import BadRequest

_BASE = 256  # every digit 1..256 is exact in bfloat16 and float16


class TokenKV(NamedTuple):
    k: torch.Tensor  # [T, num_kv_heads, head_size]
    v: torch.Tensor


@dataclass(frozen=True, eq=False)
class PagedLayout:
    """Element offsets inside one block of one layer: ``k_index[t, h, j]`` is where the key of
    the block's t-th token, head h, dim j lives in the block's flattened page."""

    num_kv_heads: int
    block_size: int
    head_size: int
    dtype: torch.dtype
    k_index: torch.Tensor  # [block_size, num_kv_heads, head_size] int64
    v_index: torch.Tensor

    def read(
        self, layer: torch.Tensor, block_ids: torch.Tensor, positions: torch.Tensor
    ) -> TokenKV:
        return read(layer, self, block_ids, positions)

    def write(
        self, layer: torch.Tensor, block_ids: torch.Tensor, positions: torch.Tensor, kv: TokenKV
    ) -> None:
        write(layer, self, block_ids, positions, kv)

    def check(self, layer: torch.Tensor) -> None:
        want = (self.num_kv_heads, self.block_size, 2 * self.head_size)
        if tuple(layer.shape[1:]) != want or layer.dtype != self.dtype:
            raise BadRequest(
                f"KV cache layer {tuple(layer.shape)} {layer.dtype} is not the CPU layout "
                f"[blocks, {want[0]}, {want[1]}, {want[2]}] {self.dtype}: use vLLM's CPU backend"
            )


def cpu_isa(dtype: torch.dtype, block_size: int, head_size: int, kv_cache_dtype: str) -> str:
    """The instruction set vLLM's CPU attention picks for these settings (the kernel's tiling)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, kv_cache_dtype)


def probe(
    num_kv_heads: int, block_size: int, head_size: int, dtype: torch.dtype, isa: str
) -> PagedLayout:
    """Learn the block arrangement from vLLM's ``cpu_attn_reshape_and_cache`` for ``isa``."""
    from vllm import _custom_ops as ops

    H, bs, d = num_kv_heads, block_size, head_size
    n = bs * H * d
    src = torch.arange(n, dtype=torch.int64).view(bs, H, d)
    found = torch.zeros(2 * n, dtype=torch.int64)  # per page offset: source index
    sign = None
    for p in range(max(1, math.ceil(math.log(n, _BASE)))):
        digit = (src // _BASE**p) % _BASE + 1  # 1..256; 0 marks an offset nothing wrote
        page = torch.zeros((1, H, bs, 2 * d), dtype=dtype)
        kc, vc = page.view(1, H, 2 * bs, d).chunk(2, dim=2)
        key, value = digit.to(dtype), (-digit).to(dtype)
        ops.cpu_attn_reshape_and_cache(key, value, kc, vc, torch.arange(bs), isa)
        flat = page.flatten().to(torch.float64).round().to(torch.int64)
        if sign is None:
            sign = flat.sign()
        assert torch.equal(flat.sign(), sign), "the write op moved elements between passes"
        found += (flat.abs() - 1) * _BASE**p
    assert sign is not None
    k_off, v_off = (sign > 0).nonzero().squeeze(1), (sign < 0).nonzero().squeeze(1)
    if k_off.numel() != n or v_off.numel() != n:
        raise BadRequest(f"CPU KV layout for isa {isa!r} is not a permutation: unsupported")
    k_index = torch.full((n,), -1, dtype=torch.int64)
    v_index = torch.full((n,), -1, dtype=torch.int64)
    k_index[found[k_off]] = k_off
    v_index[found[v_off]] = v_off
    if bool((k_index < 0).any()) or bool((v_index < 0).any()):
        raise BadRequest(f"CPU KV layout for isa {isa!r} is not a permutation: unsupported")
    return PagedLayout(H, bs, d, dtype, k_index.view(bs, H, d), v_index.view(bs, H, d))


def token_slots(
    block_size: int, block_ids: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(engine block, offset in it) of each request token at ``positions``; ``block_ids`` are
    the request's blocks in order."""
    idx = positions // block_size
    if bool((idx >= block_ids.shape[0]).any()):
        raise BadRequest("a position lies past the request's allocated blocks")
    return block_ids[idx], positions % block_size


def check_token_kv(kv: TokenKV, positions: torch.Tensor, heads: int, head_size: int) -> None:
    """K/V handed to a write must hold one [heads, head_size] row per position."""
    want = (positions.shape[0], heads, head_size)
    if tuple(kv.k.shape) != want or tuple(kv.v.shape) != want:
        raise BadRequest(f"K/V to write must be {want}, got {tuple(kv.k.shape)}")


def read(
    layer: torch.Tensor, layout: PagedLayout, block_ids: torch.Tensor, positions: torch.Tensor
) -> TokenKV:
    """K/V of the request tokens at ``positions``; ``block_ids`` are the request's blocks in
    order. Returns new tensors."""
    layout.check(layer)
    blocks, offs = token_slots(layout.block_size, block_ids, positions)
    pages = layer.view(layer.shape[0], -1)
    rows = blocks[:, None, None]
    return TokenKV(pages[rows, layout.k_index[offs]], pages[rows, layout.v_index[offs]])


def write(
    layer: torch.Tensor,
    layout: PagedLayout,
    block_ids: torch.Tensor,
    positions: torch.Tensor,
    kv: TokenKV,
) -> None:
    """Store ``kv`` ([T, H, d] each) as the tokens at ``positions``; mutates ``layer`` only."""
    layout.check(layer)
    check_token_kv(kv, positions, layout.num_kv_heads, layout.head_size)
    blocks, offs = token_slots(layout.block_size, block_ids, positions)
    pages = layer.view(layer.shape[0], -1)
    rows = blocks[:, None, None]
    pages[rows, layout.k_index[offs]] = kv.k.to(layer.dtype)
    pages[rows, layout.v_index[offs]] = kv.v.to(layer.dtype)
