"""Scheduler half of the vLLM connector: prefix keys, non-blocking lookups, load/save plans.

The scheduler never touches KV bytes. It hashes each prompt into block keys once, asks the
service how long a prefix it holds (off the step loop: a lookup still running after
``lookup_wait_s`` makes vLLM ask again next step, and one still running at ``lookup_timeout_s``
is a miss), and tells the workers which engine blocks to fill from which keys (loads) and
which freshly computed full prompt blocks to store (saves). Decode tokens are never saved.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from cacheservice.client import DEFAULT_URL, CacheClient
from cacheservice.errors import BadRequest, UnknownNamespace
from connectors.gate import WAITING, Gate, poll_lookup
from connectors.settings import ExtraSettings
from connectors.vllm.identity import vllm_kv_layout_tag, weights_fingerprint
from index.hashing import ROOT_KEY, Namespace, prefix_keys

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("cacheservice.connectors.vllm")


@dataclass(frozen=True)
class Settings(ExtraSettings):
    """``kv_connector_extra_config`` keys, all optional."""

    url: str = DEFAULT_URL
    token: str | None = None
    timeout_s: float = 2.0  # any one control-plane call from a worker off the step (saves)
    step_timeout_s: float = 1.0  # a worker call inside an engine step (acquire, reserve)
    lookup_wait_s: float = 0.02  # how long one scheduler step waits for a lookup
    lookup_timeout_s: float = 0.5  # a lookup not answered by then is a miss
    retry_s: float = 2.0  # after a failed call, the service is skipped this long
    # KV events (events.py): how the service reaches this engine's kv_events_config endpoints
    engine_id: str | None = None  # default: kv_transfer_config.engine_id
    engine_url: str = ""  # where a router sends this engine's requests (echoed by /v1/route)
    events_host: str = "127.0.0.1"  # replaces '*' in the endpoints vLLM binds
    register_every_s: float = 5.0


@dataclass(frozen=True)
class CacheLayout:
    """What makes this engine's blocks compatible with another's, and their size."""

    namespaces: tuple[Namespace, ...]  # one per tensor-parallel rank
    block_bytes: int  # one block's payload: its bytes in every layer, layers in order
    layers: tuple[str, ...]
    layer_bytes: int
    block_tokens: int


def cache_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> CacheLayout:
    from vllm.v1.kv_cache_interface import AttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
        raise BadRequest(
            "CacheServiceConnector supports models with one full-attention KV cache group; "
            f"this model has {len(groups)} groups: remove kv_transfer_config for it"
        )
    spec = groups[0].kv_cache_spec
    layers = tuple(groups[0].layer_names)
    kernel = vllm_kv_layout_tag(vllm_config, spec, kv_cache_config.kv_cache_layout)
    layout = f"{kernel}/kvh{spec.num_kv_heads}/d{spec.head_size}/L{len(layers)}"
    tp = vllm_config.parallel_config.tensor_parallel_size
    mc = vllm_config.model_config
    weights = weights_fingerprint(mc.model, mc.revision, mc.hf_config.to_json_string())
    model = f"{mc.model}#w{weights}"
    dtype = str(spec.dtype).removeprefix("torch.")
    namespaces = tuple(
        Namespace(model, dtype, layout, spec.block_size, tp_rank=r, tp_size=tp) for r in range(tp)
    )
    page = spec.page_size_bytes
    return CacheLayout(namespaces, page * len(layers), layers, page, spec.block_size)


class _Blocks(Protocol):
    block_ids: list[int]


B = TypeVar("B", bound=_Blocks)


def scheduled(so: SchedulerOutput, reqs: Mapping[str, B]) -> Iterator[tuple[str, B, int]]:
    """``(req_id, state, tokens computed once this step has run)`` for each request of ``so``
    that ``reqs`` tracks, its ``state.block_ids`` brought up to the engine's blocks first."""
    for new in so.scheduled_new_reqs:
        st = reqs.get(new.req_id)
        if st is not None:
            st.block_ids = list(new.block_ids[0])
            yield new.req_id, st, new.num_computed_tokens + so.num_scheduled_tokens[new.req_id]
    cached = so.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        st = reqs.get(req_id)
        if st is None:
            continue
        new_ids = cached.new_block_ids[i]
        if req_id in cached.resumed_req_ids and new_ids is not None:
            st.block_ids = list(new_ids[0])  # a preempted request gets all its blocks anew
        elif new_ids is not None:
            st.block_ids.extend(new_ids[0])
        yield req_id, st, cached.num_computed_tokens[i] + so.num_scheduled_tokens[req_id]


@dataclass(frozen=True)
class LoadSpec:
    req_id: str
    keys: tuple[tuple[bytes, ...], ...]  # [tp_rank][i]: key of the block that fills block_ids[i]
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class SaveSpec:
    req_id: str
    keys: tuple[tuple[bytes, ...], ...]  # [tp_rank][i]: key of block_ids[i]
    parents: tuple[bytes, ...]  # [tp_rank]: key of the block before keys[r][0]
    block_ids: tuple[int, ...]


@dataclass
class CacheServiceMeta(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Request:
    prompt_len: int
    keys: tuple[list[bytes], ...]  # [tp_rank]: keys of the prompt's full blocks
    deadline: float
    lookup: Future | None = None
    hits: int | None = None
    local_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    planned: int = 0  # blocks [0, planned) are stored, loaded or already sent to save


class SchedulerSide:
    def __init__(self, settings: Settings, layout: CacheLayout):
        self.s, self.layout = settings, layout
        self.client = CacheClient(settings.url, settings.token, timeout=settings.lookup_timeout_s)
        self.gate = Gate(settings.retry_s, self.client.health)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cs-lookup")
        self._registered = False
        self._reqs: dict[str, _Request] = {}
        self._loads: list[LoadSpec] = []

    def _lookup(self, keys: list[bytes]) -> int:
        ns = self.layout.namespaces[0]
        for _ in range(2):
            if not self._registered:
                self.client.register(ns, self.layout.block_bytes)
                self._registered = True
            try:
                return self.client.lookup(ns.id, keys, tiers=False).hits
            except UnknownNamespace:  # the service lost its namespaces: register again
                self._registered = False
        return 0

    def _state(self, request) -> _Request | None:
        st = self._reqs.get(request.request_id)
        if st is None:
            tokens = request.prompt_token_ids or []
            bt = self.layout.block_tokens
            if len(tokens) < bt or request.cache_salt:
                return None  # salted requests are private to their tenant: never shared
            keys = tuple(prefix_keys(tokens, ns.seed, bt) for ns in self.layout.namespaces)
            deadline = time.monotonic() + self.s.lookup_timeout_s
            st = self._reqs[request.request_id] = _Request(len(tokens), keys, deadline)
        return st

    def _hits(self, st: _Request) -> int | None:
        if st.hits is not None:
            return st.hits
        if st.lookup is None:
            if not self.gate.open:
                st.hits = 0
                return 0
            st.lookup = self._pool.submit(self._lookup, st.keys[0])
        found = poll_lookup(st.lookup, self.s.lookup_wait_s, st.deadline, self.gate)
        if found is WAITING:
            return None  # vLLM asks again next step; the step loop goes on
        st.hits = found or 0
        return st.hits

    def get_num_new_matched_tokens(
        self, request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        st = self._state(request)
        if st is None:
            return 0, False
        bt = self.layout.block_tokens
        # At least one token is always computed, so vLLM has logits to sample from.
        usable = min(len(st.keys[0]), (request.num_tokens - 1) // bt)
        if usable * bt <= num_computed_tokens:
            return 0, False
        hits = self._hits(st)
        if hits is None:
            return None, False
        matched = min(hits, usable) * bt - num_computed_tokens
        if matched <= 0:
            return 0, False
        st.local_tokens = num_computed_tokens
        return matched, False  # loaded within the step that computes the rest (worker.py)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        st.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens <= 0:
            return
        bt = self.layout.block_tokens
        first, last = st.local_tokens // bt, (st.local_tokens + num_external_tokens) // bt
        keys = tuple(tuple(k[first:last]) for k in st.keys)
        self._loads.append(LoadSpec(request.request_id, keys, tuple(st.block_ids[first:last])))
        st.planned = max(st.planned, last)  # the service holds these already

    def _plan_save(self, req_id: str, st: _Request, computed: int, meta: CacheServiceMeta) -> None:
        full = min(min(computed, st.prompt_len) // self.layout.block_tokens, len(st.keys[0]))
        first = st.planned
        if full <= first or len(st.block_ids) < full:
            return
        keys = tuple(tuple(k[first:full]) for k in st.keys)
        parents = tuple(k[first - 1] if first else ROOT_KEY for k in st.keys)
        meta.saves.append(SaveSpec(req_id, keys, parents, tuple(st.block_ids[first:full])))
        st.planned = full

    def build_connector_meta(self, so: SchedulerOutput) -> CacheServiceMeta:
        meta = CacheServiceMeta(loads=self._loads)
        self._loads = []
        if not self.gate.open:  # the service failed us: a save would only wait on it
            return meta
        for req_id, st, done in scheduled(so, self._reqs):
            self._plan_save(req_id, st, done, meta)  # nothing once the prompt is stored
        return meta

    def blocks_failed(self, block_ids: set[int]) -> None:
        """Loads of these engine blocks failed: vLLM recomputes them, so they may be saved, and
        the request's hit ends before the first of them. Asked again (vLLM resets the request
        to the failed block), it must not be promised the same failing blocks: that loop is
        a livelock while the service is down or the block stays corrupt."""
        for st in self._reqs.values():
            bad = [i for i, b in enumerate(st.block_ids[: st.planned]) if b in block_ids]
            if bad:
                st.planned = bad[0]
                st.hits = min(st.hits if st.hits is not None else bad[0], bad[0])

    def request_finished(self, request) -> None:
        self._reqs.pop(request.request_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
