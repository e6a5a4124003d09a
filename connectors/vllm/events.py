"""Tell the service where this engine publishes its KV events, so its index knows this
engine's own cache (the GPU tier) and can route prompts to it.

Only the connector knows both halves: vLLM's ``kv_events_config`` (the ZMQ endpoints) and our
namespace for this engine's KV. The scheduler side registers the engine in the background
and again every ``register_every_s`` (a restarted service learns its engines back; the call
is idempotent). The service maps vLLM's block hashes to our keys from the tokens each event
carries, so any ``prefix_caching_hash_algo`` works; the reproducible ``sha256_cbor`` is still
the one to choose for routers that hash prompts themselves.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from cacheservice.client import CacheClient
from cacheservice.errors import CacheServiceError
from cacheservice.results import EngineSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from index.hashing import Namespace

log = logging.getLogger("cacheservice.connectors.vllm")


def _offset_port(endpoint: str, rank: int) -> str:
    """vLLM's data-parallel rule: rank r publishes on the configured port + r."""
    if rank == 0 or not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint.rpartition(":")
    return endpoint if port == "0" else f"{host}:{int(port) + rank}"


def engine_spec(vllm_config: VllmConfig, settings, ns_id: str) -> EngineSpec | None:
    """This engine's events as the service must dial them; None when it publishes none."""
    ev = vllm_config.kv_events_config
    if ev is None or not ev.enable_kv_cache_events or ev.publisher != "zmq":
        return None
    if ev.endpoint.endswith(":0"):
        log.warning("kv_events_config.endpoint %s picks a random port: not registered", ev.endpoint)
        return None
    algo = vllm_config.cache_config.prefix_caching_hash_algo
    if not algo.endswith("_cbor"):
        log.info(
            "prefix_caching_hash_algo=%r hashes through pickle: cacheservice maps blocks from "
            "their tokens and does not mind, but routers that hash prompts themselves need "
            "a reproducible one (sha256_cbor)",
            algo,
        )
    rank = vllm_config.parallel_config.data_parallel_rank
    host = settings.events_host

    def dial(endpoint: str | None) -> str | None:
        if endpoint is None:
            return None
        return _offset_port(endpoint.replace("*", host), rank)

    engine = settings.engine_id or vllm_config.kv_transfer_config.engine_id
    if rank:
        engine = f"{engine}/dp{rank}"
    return EngineSpec(engine, ns_id, dial(ev.endpoint), dial(ev.replay_endpoint), ev.topic,
                      settings.engine_url)  # fmt: skip


class EngineAnnouncer:
    """Registers one engine with the service now and every ``every_s`` seconds."""

    def __init__(
        self, client: CacheClient, spec: EngineSpec, ns: Namespace, block_bytes: int, every_s: float
    ) -> None:
        self.client, self.spec, self.ns, self.block_bytes = client, spec, ns, block_bytes
        self.every_s = every_s
        self.registered = threading.Event()  # set once the service has accepted the spec
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cs-engine-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.register(self.ns, self.block_bytes)
                self.client.register_engine(self.spec)
                self.registered.set()
            except CacheServiceError as e:  # down or refusing: try again next round
                log.debug("engine %s not registered: %s", self.spec.engine, e)
            self._stop.wait(self.every_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        try:  # a clean shutdown tells the service at once; a crash shows as a disconnect
            self.client.unregister_engine(self.spec.engine)
        except CacheServiceError:
            pass
