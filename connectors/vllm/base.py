"""The KVConnectorBase_V1 shell both cacheservice vLLM connectors share.

vLLM builds one connector per role: in the scheduler process it plans, in each worker it moves
KV. A connector here is only that split: it builds a scheduler side or a worker side and hands
every vLLM hook to it. Subclasses name their settings, their KV geometry, their metadata type
and how to build each side (connector.py, blend.py).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from cacheservice.client import CacheClient

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from connectors.vllm.events import EngineAnnouncer

log = logging.getLogger("cacheservice.connectors.vllm")
_HOOK_SECONDS = [0.0]  # time this process spent inside connector hooks, both sides


def hook_seconds() -> float:
    """Seconds spent in every connector hook of this process so far: what the connector
    itself adds to the engine's time (tests compare it per request against a budget)."""
    return _HOOK_SECONDS[0]


def _timed(hook: Callable) -> Callable:
    @functools.wraps(hook)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            _HOOK_SECONDS[0] += time.perf_counter() - start

    return timed


def announcer(vllm_config: VllmConfig, settings: Any, shape: Any) -> EngineAnnouncer | None:
    """Register this engine's KV events with the service when vLLM publishes them."""
    from connectors.vllm.events import EngineAnnouncer, engine_spec

    if not hasattr(settings, "events_host"):
        return None
    ns = shape.namespaces[0]
    spec = engine_spec(vllm_config, settings, ns.id)
    if spec is None:
        return None
    client = CacheClient(settings.url, settings.token, timeout=settings.timeout_s)
    return EngineAnnouncer(client, spec, ns, shape.block_bytes, settings.register_every_s)


class SchedulerPart(Protocol):
    """Plans loads and saves; never touches KV. Lives in the scheduler process."""

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]: ...
    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None: ...
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata: ...
    def request_finished(self, request: Request) -> None: ...
    def close(self) -> None: ...


class WorkerPart(Protocol):
    """Moves KV between vLLM's paged cache and the service. Lives in each worker process."""

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None: ...
    def start_load_kv(self, meta: Any) -> None: ...
    def wait_for_save(self, meta: Any) -> None: ...
    def get_finished(self) -> set[str] | None: ...
    def take_load_errors(self) -> set[int]: ...
    def wait_for_layer_load(self, layer_name: str) -> None: ...
    def close(self) -> None: ...


class SidedConnector(KVConnectorBase_V1):
    """Exactly one of ``_scheduler`` and ``_worker`` is set, by the role vLLM gave."""

    meta_type: ClassVar[type[KVConnectorMetadata]]
    settings_type: ClassVar[Any]  # a dataclass with ``from_extra(kv_connector_extra_config)``
    shape_of: ClassVar[Callable[[VllmConfig, KVCacheConfig], Any]]  # a staticmethod

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config)
        settings = self.settings_type.from_extra(extra)
        shape = self.shape_of(vllm_config, kv_cache_config)
        self._scheduler: SchedulerPart | None = None
        self._worker: WorkerPart | None = None
        if role == KVConnectorRole.SCHEDULER:
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                # A cache miss is never an error: a block that fails to load is recomputed.
                log.info("%s sets kv_load_failure_policy='recompute'", type(self).__name__)
                self._kv_transfer_config.kv_load_failure_policy = "recompute"
            self._scheduler = self._scheduler_side(settings, shape)
            self._announcer = announcer(vllm_config, settings, shape)
        else:
            self._worker = self._worker_side(settings, shape, vllm_config, kv_cache_config)

    def _scheduler_side(self, settings: Any, shape: Any) -> SchedulerPart:
        raise NotImplementedError

    def _worker_side(
        self, settings: Any, shape: Any, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig
    ) -> WorkerPart:
        raise NotImplementedError

    def _meta(self) -> KVConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, self.meta_type), "metadata from another connector"
        return meta

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is only a future miss

    # -- worker side ----------------------------------------------------------------------

    @_timed
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    @_timed
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker.start_load_kv(self._meta())

    @_timed
    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # KV is saved after every layer has written it (wait_for_save)

    @_timed
    def wait_for_save(self) -> None:
        self._worker.wait_for_save(self._meta())

    @_timed
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self._worker.get_finished()

    @_timed
    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def shutdown(self) -> None:
        if getattr(self, "_announcer", None) is not None:
            self._announcer.close()
        (self._worker or self._scheduler).close()

    # -- scheduler side -------------------------------------------------------------------

    @_timed
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    @_timed
    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    @_timed
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    @_timed
    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        return  # failed loads come back as invalid blocks, which vLLM recomputes

    @_timed
    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler.request_finished(request)
        return False, None
