"""vLLM KV connector backed by cacheservice: prefix reuse across requests, engine restarts and
engines on one host.

Load it with::

    KVTransferConfig(kv_connector="CacheServiceConnector",
                     kv_connector_module_path="connectors.vllm", kv_role="kv_both",
                     kv_connector_extra_config={"url": "http://127.0.0.1:8642"})

The scheduler half (scheduler.py) finds hits and plans loads and saves; the
worker half (worker.py) moves block bytes through the service's shared-memory
arena. The service is a cache: when it is down, slow or returns a corrupt block, the engine
recomputes and answers the same tokens; it never fails a request because of the service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.v1.metrics.cache_hit_source import CacheHitSource

from connectors.vllm.base import SidedConnector, _timed
from connectors.vllm.scheduler import (
    CacheLayout,
    CacheServiceMeta,
    SchedulerSide,
    Settings,
    cache_layout,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput

    from connectors.vllm.worker import WorkerSide

__all__ = ["CacheServiceConnector", "CacheServiceMeta"]


class CacheServiceConnector(SidedConnector):
    _cache_hit_source = CacheHitSource.HOST
    meta_type = CacheServiceMeta
    settings_type = Settings
    shape_of = staticmethod(cache_layout)

    def _scheduler_side(self, settings: Settings, layout: CacheLayout) -> SchedulerSide:
        return SchedulerSide(settings, layout)

    def _worker_side(
        self,
        settings: Settings,
        layout: CacheLayout,
        vllm_config: VllmConfig,
        kv_cache_config: KVCacheConfig,
    ) -> WorkerSide:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        from connectors.vllm.worker import WorkerSide

        rank = get_tensor_model_parallel_rank()
        return WorkerSide(settings, layout, rank, kv_cache_config.num_blocks)

    @_timed
    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if connector_output.invalid_block_ids:
            # Those loads failed: vLLM recomputes the blocks, so they may be saved after all.
            self._scheduler.blocks_failed(connector_output.invalid_block_ids)
