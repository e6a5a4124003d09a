"""Worker half of the vLLM connector: copies whole KV blocks between the engine's paged KV
cache and the service's shared-memory arena.

A block's payload in the arena is the concatenation of that block's bytes in every attention
layer, in the layer order of the KV cache group, each layer's block copied as opaque bytes
(the CPU backend's transposed key tiles included). Loads run on a background thread and are
reported through ``get_finished``; a block whose checksum does not match, that the service
could not produce, or that arrives while the service is failing is reported as a load error so
vLLM recomputes it. Saves copy into reserved slots right after the forward, before vLLM can
reuse the blocks, and commit them; the service skips blocks it already holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import torch
import xxhash

from cacheservice.arena import ArenaClient, ArenaView
from cacheservice.client import CacheClient
from cacheservice.errors import BadRequest, CacheServiceError, ServiceUnavailable, UnknownNamespace
from cacheservice.results import ReserveResult
from connectors.vllm.copies import BlockCopier
from connectors.vllm.scheduler import (
    CacheLayout,
    CacheServiceMeta,
    Gate,
    LoadSpec,
    SaveSpec,
    Settings,
)

log = logging.getLogger("cacheservice.connectors.vllm")


def block_major(cache: torch.Tensor, num_blocks: int, name: str) -> torch.Tensor:
    """The layer's cache with engine blocks on dim 0, as vLLM declares it: a layer view is the
    logical ``[B, H, N, C]`` (``vllm.v1.kv_cache_interface.create_kv_cache_views``), B being
    ``num_blocks`` times the kernel blocks per manager block (``group_kernel_blocks``). The
    axis is never guessed from sizes: another dimension may equal ``num_blocks`` by chance."""
    if cache.dim() < 2 or cache.shape[0] % num_blocks:
        raise BadRequest(
            f"layer {name} cache {tuple(cache.shape)} does not have vLLM's block-major layout "
            f"(dim 0 a multiple of num_blocks={num_blocks}): this vLLM is not supported"
        )
    if cache.shape[0] == num_blocks:
        return cache
    return cache.unflatten(0, (num_blocks, -1))


S = TypeVar("S")


class Loads(Generic[S]):
    """Per-request loads run one at a time on a background thread and collected on the engine's
    thread: ``finish(spec, future)`` runs there once a load is done and returns the engine
    blocks it did not fill, which vLLM then recomputes (``take_errors``)."""

    def __init__(self, thread_name: str, finish: Callable[[S, Future], Iterable[int]]):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._finish = finish
        self._loading: dict[str, tuple[S, Future]] = {}
        self._errors: set[int] = set()

    def start(self, req_id: str, spec: S, load: Callable[[S], object]) -> None:
        self._loading[req_id] = (spec, self._pool.submit(load, spec))

    def finished(self) -> set[str] | None:
        finished: set[str] = set()
        for req_id, (spec, fut) in list(self._loading.items()):
            if not fut.done():
                continue
            del self._loading[req_id]
            self._errors.update(self._finish(spec, fut))
            finished.add(req_id)
        return finished or None

    def take_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class WorkerSide:
    def __init__(self, settings: Settings, layout: CacheLayout, tp_rank: int, num_blocks: int):
        self.layout, self.rank, self.num_blocks = layout, tp_rank, num_blocks
        self.ns = layout.namespaces[tp_rank]
        self.client = CacheClient(settings.url, settings.token, timeout=settings.timeout_s)
        self.gate = Gate(settings.retry_s, self.client.health)
        self._copier: BlockCopier | None = None  # set by register_kv_caches
        self._arena: ArenaClient | None = None
        self._arena_lock = threading.Lock()
        self._loads: Loads[LoadSpec] = Loads("cs-load", self._finish_load)
        # Commits (writer checksum + HTTP) run here, in order, off the engine's step.
        self._commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cs-commit")
        self.stats = {"loaded_blocks": 0, "failed_blocks": 0, "saved_blocks": 0}
        self.stats |= {"load_s": 0.0, "acquire_s": 0.0, "save_s": 0.0}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.layout.layers if name not in kv_caches]
        assert not missing, f"KV caches missing for layers {missing}"
        layers = []
        for name in self.layout.layers:
            t = block_major(kv_caches[name], self.num_blocks, name)
            block = t.select(0, 0)
            nbytes = block.numel() * block.element_size()
            if nbytes != self.layout.layer_bytes:
                raise BadRequest(
                    f"layer {name} holds {nbytes} bytes per block, the KV spec says "
                    f"{self.layout.layer_bytes}: this KV cache layout is not supported"
                )
            layers.append(t)
        self._copier = BlockCopier(layers, self.layout.layer_bytes)

    # -- the data plane -------------------------------------------------------------------

    def _arena_view(self) -> ArenaView:
        with self._arena_lock:
            if self._arena is None:
                info = self.client.register(self.ns, self.layout.block_bytes)
                self._arena = ArenaClient(info.arena["path"])
            return self._arena.current()  # remapped if a restarted service replaced the file

    def _call(self, fn, *args):
        """A service call that may be retried once after the service forgot the namespace."""
        try:
            return fn(*args)
        except UnknownNamespace:
            with self._arena_lock:
                self._arena = None
            self._arena_view()
            return fn(*args)

    # -- loads ----------------------------------------------------------------------------

    def _load(self, spec: LoadSpec) -> int:
        """Fill ``spec.block_ids`` from the service; returns how many leading blocks loaded."""
        if not self.gate.open:
            return 0
        keys = list(spec.keys[self.rank])
        try:
            arena = self._arena_view()
            start = time.perf_counter()
            acq = self._call(self.client.acquire, self.ns.id, keys)
            self.stats["acquire_s"] += time.perf_counter() - start
        except ServiceUnavailable as e:
            self.gate.failed(e)
            return 0
        except CacheServiceError as e:
            log.error("cacheservice refused a load, recomputing: %s", e)
            return 0
        done = 0
        try:
            for slot, csum, length in zip(acq.slots, acq.checksums, acq.lengths, strict=False):
                if done == len(keys) or length != self.layout.block_bytes:
                    break
                if xxhash.xxh3_64_intdigest(arena.payload(slot, length)) != csum:
                    log.warning("block %s failed its checksum, recomputing", keys[done].hex())
                    break
                done += 1
            self._copier.load(arena, list(acq.slots[:done]), list(spec.block_ids[:done]))
        finally:
            try:
                if acq.lease:  # an acquire that found nothing opened no lease
                    self.client.release(acq.lease)
            except CacheServiceError as e:  # the lease expires on its own
                log.info("release failed: %s", e)
        return done

    def _timed_load(self, spec: LoadSpec) -> int:
        start = time.perf_counter()
        try:
            return self._load(spec)
        finally:
            self.stats["load_s"] += time.perf_counter() - start

    def _finish_load(self, spec: LoadSpec, fut: Future) -> tuple[int, ...]:
        try:
            done = fut.result()
        except Exception:  # a bug must not take the engine down: recompute instead
            log.exception("load of %s failed", spec.req_id)
            done = 0
        failed = spec.block_ids[done:]
        self.stats["loaded_blocks"] += done
        self.stats["failed_blocks"] += len(failed)
        return failed

    def start_load_kv(self, meta: CacheServiceMeta) -> None:
        for spec in meta.loads:
            self._loads.start(spec.req_id, spec, self._timed_load)

    def get_finished(self) -> set[str] | None:
        return self._loads.finished()

    def take_load_errors(self) -> set[int]:
        return self._loads.take_errors()

    # -- saves ----------------------------------------------------------------------------

    def _save(self, spec: SaveSpec) -> None:
        """Copy the request's new blocks into reserved slots now (vLLM may reuse its blocks
        once the step ends); checksum and commit them on the save thread, off the step."""
        keys = list(spec.keys[self.rank])
        res = self._call(self.client.reserve, self.ns.id, keys, spec.parents[self.rank])
        if not res.lease:
            return  # nothing to store: all held already, or no room
        # Mapped after the reserve: the arena that gave these slots. Should it have been
        # replaced anyway, the checksums of what we wrote will not match the slots' bytes and
        # the service publishes nothing.
        arena = self._arena_view()
        pairs = [(s, b) for s, b in zip(res.slots, spec.block_ids, strict=False) if s is not None]
        self._copier.save(arena, [s for s, _ in pairs], [b for _, b in pairs])
        self._commits.submit(self._commit, arena, res)

    def _commit(self, arena: ArenaView, res: ReserveResult) -> None:
        try:
            n = self.layout.block_bytes
            sums = [None if s is None else xxhash.xxh3_64_intdigest(arena.payload(s, n))
                    for s in res.slots]  # fmt: skip
            self.stats["saved_blocks"] += self.client.commit(
                res.lease, [s is not None for s in res.slots], sums
            )
        except ServiceUnavailable as e:
            self.gate.failed(e)
        except Exception as e:  # a refused commit only loses a future hit
            log.error("cacheservice commit skipped: %r", e)

    def wait_for_save(self, meta: CacheServiceMeta) -> None:
        start = time.perf_counter()
        for spec in meta.saves:
            if not self.gate.open:
                break
            try:
                self._save(spec)
            except ServiceUnavailable as e:
                self.gate.failed(e)
            except Exception as e:  # a refused save, or a bug here, only loses a future hit
                log.error("cacheservice save skipped: %r", e)
        self.stats["save_s"] += time.perf_counter() - start

    def flush(self) -> None:
        """Wait until every save handed to the save thread is committed (or failed)."""
        self._commits.submit(lambda: None).result()

    def close(self) -> None:
        self._loads.close()
        self._commits.shutdown(wait=True)  # committed blocks reach the service before exit
        self.client.close()
