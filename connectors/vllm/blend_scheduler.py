"""Scheduler half of the blend connector: settings, chunk lookups and load/save plans.

The scheduler never touches KV. For a request that declares chunks (spans, or separator
tokens) it asks the service which of them it holds, off the step loop as the prefix connector
does (``lookup_wait_s`` per step, a miss at ``lookup_timeout_s``, the service skipped for
``retry_s`` after a failure). It claims the prompt up to the last block boundary at or before
the end of the last held chunk and tells the worker which blocks to fill. Chunks the service
lacks are planned for saving once vLLM has computed them.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from cacheservice.client import DEFAULT_URL, CacheClient
from cacheservice.errors import BadRequest
from connectors.blend.chunking import Chunk, from_separators, from_spans
from connectors.blend.recompute import FirstK, NoRecompute, Policy, TopRatio
from connectors.gate import WAITING, poll_lookup
from connectors.settings import ExtraSettings
from connectors.vllm.identity import weights_fingerprint
from connectors.vllm.scheduler import Gate, scheduled
from index.hashing import Namespace

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("cacheservice.connectors.vllm.blend")

POLICIES = ("first_k", "top_ratio", "none", "full")


@dataclass(frozen=True)
class BlendSettings(ExtraSettings):
    """``kv_connector_extra_config`` keys, all optional."""

    url: str = DEFAULT_URL
    token: str | None = None
    timeout_s: float = 2.0  # any one control-plane call off the step (the scheduler's lookups)
    step_timeout_s: float = 1.0  # a worker call inside an engine step (chunk fetch and save)
    lookup_wait_s: float = 0.02  # how long one scheduler step waits for a chunk lookup
    lookup_timeout_s: float = 0.5  # a lookup not answered by then is a miss
    retry_s: float = 2.0  # after a failed call, the service is skipped this long
    policy: str = "first_k"
    first_k: int = 4
    ratio: float = 0.15  # top_ratio: fraction of chunk tokens recomputed
    select_layer: int = 1  # top_ratio: layer where deviations are ranked
    min_chunk_tokens: int = 8  # shorter declared spans stay ordinary tokens

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise BadRequest(f"blend policy {self.policy!r} unknown: use one of {POLICIES}")


def make_policy(p: dict[str, Any]) -> Policy:
    """The recompute policy a request asked for (engine defaults filled in)."""
    kind = p["policy"]
    if kind not in POLICIES:
        raise BadRequest(f"blend policy {kind!r} unknown: use one of {POLICIES}")
    if kind == "first_k":
        return FirstK(int(p["first_k"]))
    if kind == "top_ratio":
        return TopRatio(float(p["ratio"]), int(p["select_layer"]))
    if kind == "full":
        return FirstK(1 << 30)  # every chunk token: a full prefill, to measure the others
    return NoRecompute()


@dataclass(frozen=True)
class BlendShape:
    """What the worker and scheduler agree on: the chunk namespace and the KV geometry."""

    ns: Namespace
    model_path: str
    layers: tuple[str, ...]
    num_kv_heads: int
    head_size: int
    block_tokens: int
    dtype: str


def blend_shape(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> BlendShape:
    from vllm.v1.kv_cache_interface import AttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
        raise BadRequest("CacheServiceBlendConnector needs one full-attention KV cache group")
    if vllm_config.parallel_config.tensor_parallel_size != 1:
        raise BadRequest("CacheServiceBlendConnector supports tensor_parallel_size=1 only")
    spec = groups[0].kv_cache_spec
    layers = tuple(groups[0].layer_names)
    dtype = str(spec.dtype).removeprefix("torch.")
    # Chunk payloads are per-token K/V, not engine pages: the layout names only the geometry.
    layout = f"blend/tokens/kvh{spec.num_kv_heads}/d{spec.head_size}/L{len(layers)}"
    mc = vllm_config.model_config
    model = mc.model
    weights = weights_fingerprint(model, mc.revision, mc.hf_config.to_json_string())
    ns = Namespace(f"{model}#w{weights}", dtype, layout, spec.block_size)
    return BlendShape(ns, model, layers, spec.num_kv_heads, spec.head_size, spec.block_size, dtype)


@dataclass(frozen=True)
class BlendLoad:
    req_id: str
    tokens: tuple[int, ...]  # the prompt through num_tokens + 1 and through every chunk
    num_tokens: int  # claimed, block aligned
    chunks: tuple[Chunk, ...]  # held chunks that start inside the claimed prefix
    block_ids: tuple[int, ...]  # the blocks of the claimed prefix
    policy: dict[str, Any]


@dataclass(frozen=True)
class ChunkSave:
    req_id: str
    tokens: tuple[int, ...]
    chunk: Chunk
    block_ids: tuple[int, ...]  # the request's blocks up to the chunk's end


@dataclass
class BlendMeta(KVConnectorMetadata):
    loads: list[BlendLoad] = field(default_factory=list)
    saves: list[ChunkSave] = field(default_factory=list)


class _Found(NamedTuple):
    chunks: list[Chunk]  # every chunk the request declared
    held: list[Chunk]  # those the service holds


@dataclass
class _Req:
    tokens: list[int]
    policy: dict[str, Any]
    lookup: Future[_Found]
    deadline: float
    decided: bool = False
    to_save: list[Chunk] = field(default_factory=list)  # held by nobody: store once computed
    claimed: int = 0
    pending: BlendLoad | None = None  # claimed, waiting for vLLM to allocate its blocks
    block_ids: list[int] = field(default_factory=list)


class BlendScheduler:
    """Finds held chunks off the step loop and plans loads and saves. Any failure is a miss:
    nothing is claimed and vLLM computes the prompt itself."""

    def __init__(self, settings: BlendSettings, shape: BlendShape):
        from connectors.blend.store import KVLayout

        self.s, self.shape = settings, shape
        self.client = CacheClient(settings.url, settings.token, timeout=settings.timeout_s)
        self.gate = Gate(settings.retry_s, self.client.health)
        geo = (len(shape.layers), shape.num_kv_heads, shape.head_size, shape.block_tokens)
        self.block_bytes = KVLayout(*geo, shape.dtype).block_bytes
        # One lookup thread: it alone sets _seed, so no lock is needed.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cs-blend-lookup")
        self._seed: int | None = None
        self._reqs: dict[str, _Req] = {}
        self._loads: list[BlendLoad] = []

    def _query(self, tokens: list[int], params: dict[str, Any]) -> _Found:
        """Runs on the lookup thread: which declared chunks does the service hold?"""
        if self._seed is None:
            self._seed = self.client.register(self.shape.ns, self.block_bytes).seed
        lo = self.s.min_chunk_tokens
        if params.get("chunks"):
            chunks = from_spans(tokens, [tuple(x) for x in params["chunks"]], self._seed, lo)
        else:
            start, end = params.get("chunk_range") or (0, len(tokens))
            chunks = from_separators(tokens, params["separators"], self._seed, start, end, lo)
        entries = self.client.lookup_chunks(self.shape.ns.id, [c.key for c in chunks])
        held = [
            c for c, e in zip(chunks, entries, strict=True)
            if e is not None and e.num_tokens == c.num_tokens
        ]  # fmt: skip
        return _Found(chunks, held)

    def _start(self, request: Request) -> _Req | None:
        params = request.kv_transfer_params or {}
        if not (params.get("chunks") or params.get("separators")) or request.cache_salt:
            return None
        if not self.gate.open:
            return None
        policy = {k: params.get(k, getattr(self.s, k)) for k in ("policy", "first_k", "ratio")}
        policy["select_layer"] = self.s.select_layer
        try:
            make_policy(policy)
        except (BadRequest, ValueError) as e:
            log.error("request %s: %s; computing it without blending", request.request_id, e)
            return None
        tokens = list(request.prompt_token_ids or [])
        lookup = self._pool.submit(self._query, tokens, params)
        deadline = time.monotonic() + self.s.lookup_timeout_s
        st = self._reqs[request.request_id] = _Req(tokens, policy, lookup, deadline)
        return st

    def _found(self, st: _Req) -> _Found | None:
        """The lookup's answer; None for a miss. Raises TimeoutError while it may still come."""
        found = poll_lookup(st.lookup, self.s.lookup_wait_s, st.deadline, self.gate)
        if found is WAITING:
            raise TimeoutError("lookup still running")
        return found

    def get_num_new_matched_tokens(
        self, request: Request, num_computed: int
    ) -> tuple[int | None, bool]:
        st = self._reqs.get(request.request_id) or self._start(request)
        if st is None:
            return 0, False
        if st.decided:  # asked again (no blocks were free last step): the same answer
            return (st.claimed, True) if st.pending is not None else (0, False)
        try:
            found = self._found(st)
        except futures.TimeoutError:
            return None, False  # vLLM asks again next step; the step loop goes on
        st.decided = True
        if found is None:
            return 0, False
        st.to_save = [c for c in found.chunks if c not in found.held]
        if not found.held or num_computed:  # an engine prefix hit keeps its exact KV
            return 0, False
        bt = self.shape.block_tokens
        # At least one prompt token is left to vLLM, so it has logits to sample from.
        claim = min(max(c.end for c in found.held) // bt, (len(st.tokens) - 1) // bt) * bt
        if claim <= 0:
            return 0, False
        st.claimed = claim
        st.to_save = []  # chunks after a blended prefix carry its approximation: not stored
        inside = tuple(c for c in found.held if c.start < claim)
        # Whole chunks travel even when the claim cuts one: its stored KV is looked up by all
        # of its tokens.
        upto = max(claim + 1, max(c.end for c in inside))
        tokens = tuple(st.tokens[:upto])
        st.pending = BlendLoad(request.request_id, tokens, claim, inside, (), st.policy)
        return claim, True

    def update_state_after_alloc(self, request, blocks: KVCacheBlocks, num_external: int):
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        st.block_ids = list(blocks.get_block_ids()[0])
        load, st.pending = st.pending, None
        if num_external <= 0 or load is None:
            return
        assert num_external == load.num_tokens, "vLLM allocated for a different claim"
        n = load.num_tokens // self.shape.block_tokens
        self._loads.append(
            BlendLoad(load.req_id, load.tokens, load.num_tokens, load.chunks,
                      tuple(st.block_ids[:n]), load.policy)
        )  # fmt: skip

    def _plan_saves(self, req_id: str, st: _Req, computed: int, meta: BlendMeta) -> None:
        bt = self.shape.block_tokens
        for c in [c for c in st.to_save if c.end <= computed]:
            need = -(-c.end // bt)
            if len(st.block_ids) < need:
                continue
            meta.saves.append(ChunkSave(req_id, tuple(st.tokens[c.start : c.end]), c,
                                        tuple(st.block_ids[:need])))  # fmt: skip
            st.to_save.remove(c)

    def build_connector_meta(self, so: SchedulerOutput) -> BlendMeta:
        meta = BlendMeta(loads=self._loads)
        self._loads = []
        for req_id, st, done in scheduled(so, self._reqs):
            self._plan_saves(req_id, st, done, meta)  # nothing once its chunks are stored
        return meta

    def request_finished(self, request) -> None:
        self._reqs.pop(request.request_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
