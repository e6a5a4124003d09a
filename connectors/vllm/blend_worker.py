"""Worker half of the blend connector: chunk KV between vLLM's paged cache and the service.

Saves read a computed chunk's per-token K/V out of the paged cache right after the forward
(before vLLM can reuse the blocks) and register it under its chunk key. A load fetches the
held chunks in ``start_load_kv`` (on the engine's thread, see async_loads.py; through the
shared-memory arena, verified); in ``get_finished`` the engine's thread re-rotates and
selectively recomputes the claimed prefix with the engine's own loaded modules
(blend_prefill over engine_model.EngineModel: no second copy of the weights) and writes every
claimed token's K/V into the request's blocks before vLLM schedules the request's remaining
tokens. Service calls inside a step run under ``step_timeout_s`` behind the gate: a dead or
hung service costs one timeout, then nothing. A load that fails for any reason reports all
its blocks as load errors: vLLM recomputes them, so a failure costs time, never correctness.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

import torch

from cacheservice.client import CacheClient
from cacheservice.errors import ServiceUnavailable
from connectors.blend.chunking import segments
from connectors.blend.recompute import ChunkKV, Segment, blend_prefill
from connectors.blend.store import ChunkStore, KVLayout
from connectors.gate import Gate
from connectors.vllm import kv_layout as kvl
from connectors.vllm.async_loads import Loads
from connectors.vllm.blend_scheduler import (
    BlendLoad,
    BlendMeta,
    BlendSettings,
    BlendShape,
    make_policy,
)
from connectors.vllm.dense_layout import VLLM_LAYER_VIEW, DenseLayout
from connectors.vllm.engine_model import EngineModel, Unsupported, find_model

log = logging.getLogger("cacheservice.connectors.vllm.blend")


def blend_segments(load: BlendLoad, cached: dict[bytes, ChunkKV | None]) -> list[Segment]:
    """Fresh and cached segments of ``load.tokens``; a chunk cut by the claim boundary keeps its
    cached head, a chunk that missed is computed, and the token after the claim is fresh."""
    return segments(load.tokens[: load.num_tokens + 1], load.chunks, cached, load.num_tokens)


class BlendWorker:
    def __init__(
        self,
        settings: BlendSettings,
        shape: BlendShape,
        cache_dtype: str,
        attention: dict[str, torch.nn.Module],
    ):
        """``attention``: vLLM's registered attention layers (static_forward_context), the
        handle on the served model's own modules."""
        self.s, self.shape, self.cache_dtype = settings, shape, cache_dtype
        self._attention = {n: attention[n] for n in shape.layers if n in attention}
        # every call of this worker runs inside an engine step
        self.client = CacheClient(settings.url, settings.token, timeout=settings.step_timeout_s)
        self.gate = Gate(settings.retry_s, self.client.health)
        geo = (len(shape.layers), shape.num_kv_heads, shape.head_size, shape.block_tokens)
        self.kv_layout = KVLayout(*geo, shape.dtype)
        self._store: ChunkStore | None = None
        self._model: EngineModel | None = None
        self._unsupported: str | None = None
        self._layers: list[torch.Tensor] = []
        self._paged: kvl.PagedLayout | DenseLayout | None = None
        self._loads: Loads[BlendLoad] = Loads(self._finish_load)
        self.stats = {"saved_chunks": 0, "blended_requests": 0, "failed_requests": 0}
        self.stats |= {"chunk_hits": 0, "chunk_misses": 0, "recompute_fraction": 0.0}
        self.stats |= {"fetch_s": 0.0, "blend_s": 0.0}  # blend_s: re-rotate, recompute, write
        self.stats["arena_reads"] = 0  # chunk reads served from shared memory (ChunkStore)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layers = [kv_caches[name] for name in self.shape.layers]
        first = self._layers[0]
        geo = (self.shape.num_kv_heads, self.shape.block_tokens, self.shape.head_size)
        if first.is_cuda:  # plain K/V vectors in the layer view vLLM declares
            self._paged = DenseLayout(VLLM_LAYER_VIEW, *geo)
            for t in self._layers:
                self._paged.canonical(t)
        else:  # the CPU kernels tile each block for their ISA: learn where elements go
            isa = kvl.cpu_isa(first.dtype, self.shape.block_tokens, self.shape.head_size,
                              self.cache_dtype)  # fmt: skip
            self._paged = kvl.probe(*geo, first.dtype, isa)
            for t in self._layers:
                self._paged.check(t)
        # Here, not later: vLLM freezes its start-up heap right after the KV caches exist.
        try:
            found = find_model(self._attention)
            self._model = EngineModel(found.root, list(self.shape.layers))
            self.stats["model_found_via"] = found.via
        except Unsupported as e:
            self._unsupported = str(e)
            log.error("blend disabled, every claimed prefix is recomputed: %s", e)

    def _chunk_store(self) -> ChunkStore:
        if self._store is None:
            device = self._layers[0].device  # chunks land there (pinned + DMA on CUDA)
            self._store = ChunkStore(self.client, self.shape.ns, self.kv_layout, device=device)
        return self._store

    # -- saves ----------------------------------------------------------------------------

    def wait_for_save(self, meta: BlendMeta) -> None:
        for save in meta.saves:
            if not self.gate.open:
                return
            try:
                c = save.chunk
                blocks = torch.tensor(save.block_ids, dtype=torch.int64)
                pos = torch.arange(c.start, c.end, dtype=torch.int64)
                kv = [self._paged.read(t, blocks, pos) for t in self._layers]
                tokens = torch.tensor(save.tokens, dtype=torch.int64)
                # packed on the host (a no-op for a CPU cache)
                keys, values = [x.k.cpu() for x in kv], [x.v.cpu() for x in kv]
                chunk = ChunkKV(tokens, c.start, keys, values)
                self.stats["saved_chunks"] += int(self._chunk_store().save(chunk))
            except ServiceUnavailable as e:
                self.gate.failed(e)
            except Exception as e:  # a refused save, or a bug here, only loses a future hit
                log.error("chunk save skipped: %r", e)

    # -- loads ----------------------------------------------------------------------------

    def _fetch(self, load: BlendLoad) -> dict[bytes, ChunkKV | None]:
        """The held chunks' KV; raises (the load then fails: vLLM recomputes) while the
        service is failing, and a failure closes the gate for the requests after it."""
        if not self.gate.open:
            raise ServiceUnavailable("cacheservice is failing: the claimed prefix is recomputed")
        start = time.perf_counter()
        tokens = torch.tensor(load.tokens, dtype=torch.int64)
        try:
            cached = self._chunk_store().load(tokens, load.chunks, strict=True)
        except ServiceUnavailable as e:
            self.gate.failed(e)
            raise
        finally:
            self.stats["fetch_s"] += time.perf_counter() - start
        self.stats["arena_reads"] = self._chunk_store().stats["arena_reads"]
        return cached

    def _blend(self, load: BlendLoad, cached: dict[bytes, ChunkKV | None]) -> None:
        """On the engine's thread, between forwards: a second thread computing beside vLLM's
        pinned CPU threads runs some hundred times slower than the same work done here."""
        start = time.perf_counter()
        if self._model is None:
            raise Unsupported(self._unsupported or "register_kv_caches has not run")
        hits = sum(v is not None for v in cached.values())
        self.stats["chunk_hits"] += hits
        self.stats["chunk_misses"] += len(cached) - hits
        with torch.no_grad():
            segs, policy = blend_segments(load, cached), make_policy(load.policy)
            res = blend_prefill(self._model, segs, policy, logits=False)
        n = load.num_tokens
        blocks = torch.tensor(load.block_ids, dtype=torch.int64)
        pos = torch.arange(n, dtype=torch.int64)
        for i, t in enumerate(self._layers):
            kv = kvl.TokenKV(res.kv.keys[i][:n], res.kv.values[i][:n])
            self._paged.write(t, blocks, pos, kv)
        self.stats["recompute_fraction"] = res.recompute_fraction
        self.stats["blend_s"] += time.perf_counter() - start

    def _finish_load(self, load: BlendLoad, fut: Future) -> tuple[int, ...]:
        try:
            self._blend(load, fut.result())
        except Exception as e:  # no blend is better than a wrong one: vLLM recomputes
            if isinstance(e, ServiceUnavailable):  # expected while the service fails
                log.warning("blend of %s skipped, recomputing: %s", load.req_id, e)
            else:
                log.exception("blend of %s failed, recomputing", load.req_id)
            self.stats["failed_requests"] += 1
            return load.block_ids
        self.stats["blended_requests"] += 1
        return ()

    def start_load_kv(self, meta: BlendMeta) -> None:
        for load in meta.loads:
            self._loads.start(load.req_id, load, self._fetch)

    def get_finished(self) -> set[str] | None:
        return self._loads.finished()

    def take_load_errors(self) -> set[int]:
        return self._loads.take_errors()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # chunks load before the request is scheduled (get_finished)

    def close(self) -> None:
        self._loads.close()
        if self._store is not None:
            self._store.close()
        self.client.close()
