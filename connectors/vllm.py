"""vLLM KV connector backed by cacheservice: prefix reuse across requests, engine restarts and
engines on one host.

Load it with::

    KVTransferConfig(kv_connector="CacheServiceConnector",
                     kv_connector_module_path="connectors.vllm", kv_role="kv_both",
                     kv_connector_extra_config={"url": "http://127.0.0.1:8642"})

The scheduler half (connectors/vllm_scheduler.py) finds hits and plans loads and saves; the
worker half (connectors/vllm_worker.py) moves block bytes through the service's shared-memory
arena. The service is a cache: when it is down, slow or returns a corrupt block, the engine
recomputes and answers the same tokens; it never fails a request because of the service.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from connectors.vllm_scheduler import CacheServiceMeta, SchedulerSide, Settings, cache_layout

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("cacheservice.connectors.vllm")

__all__ = ["CacheServiceConnector", "CacheServiceMeta"]


class CacheServiceConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        settings = Settings.from_extra(dict(self._kv_transfer_config.kv_connector_extra_config))
        layout = cache_layout(vllm_config, kv_cache_config)
        self._scheduler: SchedulerSide | None = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                # A cache miss is never an error: a block that fails to load is recomputed.
                log.info("cacheservice connector sets kv_load_failure_policy='recompute'")
                self._kv_transfer_config.kv_load_failure_policy = "recompute"
            self._scheduler = SchedulerSide(settings, layout)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            from connectors.vllm_worker import WorkerSide

            rank = get_tensor_model_parallel_rank()
            self._worker = WorkerSide(settings, layout, rank, kv_cache_config.num_blocks)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is only a future miss

    # -- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, CacheServiceMeta), "metadata from another connector"
        self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole-request and asynchronous: vLLM waits via get_finished

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # blocks are saved whole, after every layer has written them (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, CacheServiceMeta), "metadata from another connector"
        self._worker.wait_for_save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self._worker.get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def shutdown(self) -> None:
        side = self._worker or self._scheduler
        side.close()

    # -- scheduler side -------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> CacheServiceMeta:
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if connector_output.invalid_block_ids:
            self._scheduler.blocks_failed(connector_output.invalid_block_ids)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler.request_finished(request)
        return False, None
