"""vLLM KV connector for position-independent chunk reuse (CacheBlend / EPIC style).

Load it with::

    KVTransferConfig(kv_connector="CacheServiceBlendConnector",
                     kv_connector_module_path="connectors.vllm_blend", kv_role="kv_both",
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
held chunk; the worker (connectors/vllm_blend_worker.py) re-rotates the chunks' keys to their
new positions, computes the other claimed tokens and the selected chunk tokens with the
checkpoint's own weights (connectors/blend/hf_llama.py) and writes the blended KV into vLLM's
paged cache; vLLM then computes the rest of the prompt on top of it.

Blended KV approximates a full prefill (quality is measured, see the tests); it is never
stored back as a chunk. With vLLM's prefix caching on, blocks of a blended prefix could be
reused by a later request with the same prefix: keep ``enable_prefix_caching=False`` where
that approximation must not spread. CPU backend only (connectors/vllm_kv_layout.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
)

from connectors.vllm_blend_scheduler import BlendMeta, BlendScheduler, BlendSettings, blend_shape

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["BlendMeta", "CacheServiceBlendConnector"]


class CacheServiceBlendConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config)
        settings = BlendSettings.from_extra(extra)
        shape = blend_shape(vllm_config, kv_cache_config)
        self._scheduler: BlendScheduler | None = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            # A blend that fails on the worker is recomputed by vLLM, never an error.
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
            self._scheduler = BlendScheduler(settings, shape)
        else:
            from connectors.vllm_blend_worker import BlendWorker

            self._worker = BlendWorker(settings, shape, vllm_config.cache_config.cache_dtype)

    @property
    def requires_kv_delivery(self) -> bool:
        return False

    # -- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, BlendMeta), "metadata from another connector"
        self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole-request and asynchronous: vLLM waits via get_finished

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return  # chunks are read whole after the forward (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, BlendMeta), "metadata from another connector"
        self._worker.wait_for_save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self._worker.get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def shutdown(self) -> None:
        (self._worker or self._scheduler).close()

    # -- scheduler side -------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> BlendMeta:
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        return  # failed blends come back as invalid blocks, which vLLM recomputes

    def request_finished(self, request, block_ids: list[int]):
        self._scheduler.request_finished(request)
        return False, None
