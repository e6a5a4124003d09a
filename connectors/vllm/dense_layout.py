"""Per-token K/V in a GPU backend's paged KV cache, where elements sit as the layout declares.

GPU attention kernels (FlashAttention, FlashInfer, Triton) keep each token's key and value as
plain ``head_size`` vectors; only the order of the axes differs, and it is declared, never
inferred from sizes. ``axes`` names them in the tensor's own (logical) order:

- ``b`` engine block, ``n`` token within the block, ``h`` KV head, ``d`` head dimension,
- ``k`` a K/V axis of size 2 (0 = key), or ``c`` a content axis of ``2 * head_size`` holding
  the key then the value (no ``k`` then).

vLLM 0.32 hands every non-MLA backend's layer over as the logical ``[B, H, N, C]`` view
(``vllm.v1.kv_cache_interface.create_kv_cache_views``; FlashAttention splits C into key and
value at ``head_size``): ``"bhnc"``, whatever the physical stride order (NHD, HND, layer- or
block-major), which the view's strides already carry. Earlier vLLM layouts are
FlashAttention / Triton ``[2, B, N, H, D]`` (``"kbnhd"``) and FlashInfer ``[B, 2, N, H, D]``
(``"bknhd"``; HND: ``"bkhnd"``). Reads gather, writes scatter through a view of the cache
tensor: one indexing op per layer, on the cache's own device (a CUDA cache stays on it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cacheservice.errors import BadRequest
from connectors.vllm.kv_layout import TokenKV, check_token_kv, token_slots

VLLM_LAYER_VIEW = "bhnc"  # vLLM >= 0.32 (RFC #42082)
FLASH_ATTN_LEGACY, FLASHINFER_NHD, FLASHINFER_HND = "kbnhd", "bknhd", "bkhnd"


@dataclass(frozen=True)
class DenseLayout:
    axes: str
    num_kv_heads: int
    block_size: int
    head_size: int

    def __post_init__(self) -> None:
        names = set(self.axes)
        ok = len(self.axes) == len(names) and (
            names == set("bnhdk") or names == set("bnhc")
        )  # fmt: skip
        if not ok:
            raise BadRequest(
                f"KV axes {self.axes!r} must name b, n, h once each and either k and d, or c"
            )

    def sizes(self, num_blocks: int) -> tuple[int, ...]:
        """The tensor shape this layout describes for ``num_blocks`` blocks."""
        size = {"b": num_blocks, "n": self.block_size, "h": self.num_kv_heads}
        size |= {"d": self.head_size, "k": 2, "c": 2 * self.head_size}
        return tuple(size[a] for a in self.axes)

    def canonical(self, layer: torch.Tensor) -> torch.Tensor:
        """``layer`` viewed as ``[blocks, block_size, heads, 2, head_size]`` (no copy)."""
        if layer.dim() != len(self.axes):
            raise BadRequest(f"KV cache layer has {layer.dim()} dims, layout {self.axes!r} "
                             f"{len(self.axes)}: declare the backend's layout")  # fmt: skip
        want = self.sizes(layer.shape[self.axes.index("b")])
        if tuple(layer.shape) != want:
            raise BadRequest(f"KV cache layer {tuple(layer.shape)} is not {self.axes!r} "
                             f"{want}: declare the backend's layout")  # fmt: skip
        if "c" in self.axes:
            c = self.axes.index("c")
            view = layer.unflatten(c, (2, self.head_size))
            axes = self.axes[:c] + "kd" + self.axes[c + 1 :]
        else:
            view, axes = layer, self.axes
        return view.permute(*(axes.index(a) for a in "bnhkd"))

    def _slots(self, block_ids: torch.Tensor, positions: torch.Tensor, device: torch.device):
        blocks, offs = token_slots(self.block_size, block_ids, positions)
        return blocks.to(device), offs.to(device)

    def read(
        self, layer: torch.Tensor, block_ids: torch.Tensor, positions: torch.Tensor
    ) -> TokenKV:
        """K/V ([T, H, d] each, new tensors on the cache's device) of the request tokens at
        ``positions``; ``block_ids`` are the request's blocks in order."""
        view = self.canonical(layer)
        blocks, offs = self._slots(block_ids, positions, layer.device)
        kv = view[blocks, offs]  # [T, H, 2, d]
        return TokenKV(kv[:, :, 0], kv[:, :, 1])

    def write(
        self, layer: torch.Tensor, block_ids: torch.Tensor, positions: torch.Tensor, kv: TokenKV
    ) -> None:
        """Store ``kv`` as the tokens at ``positions``; mutates ``layer`` only."""
        check_token_kv(kv, positions, self.num_kv_heads, self.head_size)
        view = self.canonical(layer)
        blocks, offs = self._slots(block_ids, positions, layer.device)
        both = torch.stack((kv.k, kv.v), dim=2).to(device=layer.device, dtype=layer.dtype)
        view[blocks, offs] = both
