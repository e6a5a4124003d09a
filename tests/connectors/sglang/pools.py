"""Helpers for the SGLang backend tests: SGLang's real HiCache storage modules, a CPU host
pool in SGLang's page_first / layer_first layouts, storage configs.

SGLang's real modules import here because this test package's ``__init__`` registers the
installed ``sglang`` package without running its CUDA-only ``__init__``.

``HostPool`` stands in for SGLang's ``MHATokenToKVPoolHost``, whose module imports
``sglang.srt.utils`` (triton, torchvision) and cannot be imported on a CPU-only machine. It
allocates the same ``kv_buffer`` shapes and exposes the methods the storage path calls.
"""

from __future__ import annotations

import itertools

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

PAGE_SIZE = 4
_models = itertools.count()


class HostPool:
    """CPU host KV pool: ``kv_buffer`` is [2, layer, token, head, dim] (layer_first) or
    [2, token, layer, head, dim] (page_first), K then V."""

    def __init__(
        self,
        layout: str,
        *,
        pages: int = 16,
        page_size: int = PAGE_SIZE,
        layer_num: int = 2,
        head_num: int = 2,
        head_dim: int = 8,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        assert layout in ("page_first", "layer_first"), layout
        self.layout, self.page_size, self.dtype = layout, page_size, dtype
        self.layer_num, self.head_num, self.head_dim = layer_num, head_num, head_dim
        self.size = pages * page_size
        inner = (layer_num, self.size) if layout == "layer_first" else (self.size, layer_num)
        self.kv_buffer = torch.zeros((2, *inner, head_num, head_dim), dtype=dtype)

    def _tokens(self, kv: int, start: int) -> list[torch.Tensor]:
        """The contiguous pieces of one page of K (kv=0) or V (kv=1), in storage order."""
        end = start + self.page_size
        if self.layout == "layer_first":
            return [self.kv_buffer[kv, layer, start:end] for layer in range(self.layer_num)]
        return [self.kv_buffer[kv, start:end]]

    def get_page_buffer_meta(self, indices: torch.Tensor) -> tuple[list[int], list[int]]:
        assert len(indices) % self.page_size == 0, "whole pages only"
        ptrs: list[int] = []
        sizes: list[int] = []
        for start in indices.tolist()[:: self.page_size]:
            # layer_first pairs K and V per layer; page_first has one K and one V block.
            for k, v in zip(self._tokens(0, start), self._tokens(1, start), strict=True):
                for t in (k, v):
                    assert t.is_contiguous()
                    ptrs.append(t.data_ptr())
                    sizes.append(t.numel() * t.element_size())
        return ptrs, sizes

    def _page_view(self, index: int) -> torch.Tensor:
        end = index + self.page_size
        if self.layout == "layer_first":
            return self.kv_buffer[:, :, index:end]
        return self.kv_buffer[:, index:end]

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self._page_view(index)
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros_like(self._page_view(0)).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        view = self._page_view(index)
        view.copy_(data_page.reshape(view.shape))

    def fill(self, indices: torch.Tensor, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for start in indices.tolist()[:: self.page_size]:
            view = self._page_view(start)
            view.copy_(torch.randn(view.shape, generator=gen).to(self.dtype))

    def pages(self, indices: torch.Tensor) -> list[torch.Tensor]:
        return [self.get_data_page(i).clone() for i in indices.tolist()[:: self.page_size]]


def page_indices(first_page: int, n: int, page_size: int = PAGE_SIZE) -> torch.Tensor:
    """Host token indices of n consecutive pages (SGLang passes token indices)."""
    return torch.arange(first_page * page_size, (first_page + n) * page_size, dtype=torch.int64)


def make_model() -> str:
    return f"test-org/model-{next(_models)}"


def make_config(url: str, *, model: str | None = None, **overrides) -> HiCacheStorageConfig:
    extra = {
        "backend_name": "cacheservice",
        "module_path": "connectors.sglang",
        "class_name": "CacheServiceHiCacheStorage",
        "interface_v1": 1,
        "url": url,
        "timeout": 2.0,
        "retry_s": 0.0,
    }
    extra |= overrides.pop("extra", {})
    fields = dict(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=True,
        model_name=model or make_model(),
        extra_config=extra,
    )
    return HiCacheStorageConfig(**(fields | overrides))
