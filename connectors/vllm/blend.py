"""vLLM KV connector for position-independent chunk reuse (CacheBlend / EPIC style).

Load it with::

    KVTransferConfig(kv_connector="CacheServiceBlendConnector",
                     kv_connector_module_path="connectors.vllm.blend", kv_role="kv_both",
                     kv_connector_extra_config={"url": "http://127.0.0.1:8642"})

A request declares its reusable chunks (RAG passages, tool outputs) as prompt spans::

    SamplingParams(extra_args={"kv_transfer_params": {"chunks": [[start, end], ...]}})

or as the runs between separator tokens (``{"separators": [id, ...], "chunk_range": [start,
end]}``, the range fencing off a system prompt and the question), optionally with
``"policy"`` ("first_k", "top_ratio", "none" or "full"), ``"first_k"`` and ``"ratio"``
overriding the engine's defaults (``kv_connector_extra_config`` keys of the same
names). Chunks the service does not hold are stored after the request's prefill, per token,
keys rotated at their position then. When the service holds some of a prompt's chunks, the
connector claims the prompt up to the last block boundary at or before the end of the last
held chunk; the worker (blend_worker.py) re-rotates the chunks' keys to their
new positions, computes the other claimed tokens and the selected chunk tokens with the
engine's own loaded modules (engine_model.py: no second copy of the weights) and writes the
blended KV into vLLM's paged cache; vLLM then computes the rest of the prompt on top of it.

Blended KV approximates a full prefill (quality is measured, see the tests); it is never
stored back as a chunk. With vLLM's prefix caching on, blocks of a blended prefix could be
reused by a later request with the same prefix: keep ``enable_prefix_caching=False`` where
that approximation must not spread. Measured on vLLM's CPU backend, whose in-block tiling
kv_layout.py learns from vLLM's own cache-write op; a CUDA cache is read and written through
the layer view vLLM declares (dense_layout.py), written but never run on a GPU here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from connectors.vllm.base import SidedConnector
from connectors.vllm.blend_scheduler import (
    BlendMeta,
    BlendScheduler,
    BlendSettings,
    BlendShape,
    blend_shape,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from connectors.vllm.blend_worker import BlendWorker

__all__ = ["BlendMeta", "CacheServiceBlendConnector"]


class CacheServiceBlendConnector(SidedConnector):
    meta_type = BlendMeta
    settings_type = BlendSettings
    shape_of = staticmethod(blend_shape)

    def _scheduler_side(self, settings: BlendSettings, shape: BlendShape) -> BlendScheduler:
        return BlendScheduler(settings, shape)

    def _worker_side(
        self,
        settings: BlendSettings,
        shape: BlendShape,
        vllm_config: VllmConfig,
        kv_cache_config: KVCacheConfig,
    ) -> BlendWorker:
        from connectors.vllm.blend_worker import BlendWorker

        attention = vllm_config.compilation_config.static_forward_context
        return BlendWorker(settings, shape, vllm_config.cache_config.cache_dtype, attention)
