"""Worker half of the vLLM connector: copies whole KV blocks between the engine's paged KV
cache and the service's shared-memory arena.

A block's payload in the arena is the concatenation of that block's bytes in every attention
layer, in the layer order of the KV cache group, each layer's block copied as opaque bytes
(the CPU backend's transposed key tiles included).

Loads are synchronous: the request runs in the very step its blocks load (no extra engine
steps, as an asynchronous load costs). ``start_load_kv`` acquires the step's blocks. A CPU
cache is filled there and then, every block checksummed as it lands (host_copy.py: tiles
copied and hashed while cached, on two threads); a GPU cache's blocks are verified in the
arena, then move on a side stream with one event per layer, so vLLM's
``wait_for_layer_load`` lets the first layers compute while the rest are in flight
(transfer.py). A block whose checksum does not match, that the service could not produce, or
that arrives while the service is failing is reported through vLLM's failed-block API, which
recomputes from it.
Calls inside a step (acquire, reserve) run under their own short timeout (``step_timeout_s``),
and an open gate is the only way to reach the service, so a dead or hung service costs at most
one timeout, then nothing.

Saves copy into reserved slots right after the forward, before vLLM can reuse the blocks (a
CPU cache's checksums computed by the same copy; on a GPU enqueued on the side stream, and
hashed once the copies are done), and commit them on a thread off the step; the service
skips blocks it already holds.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xxhash

from cacheservice.arena import ArenaClient, ArenaView
from cacheservice.client import CacheClient
from cacheservice.errors import BadRequest, CacheServiceError, ServiceUnavailable, UnknownNamespace
from cacheservice.results import ReserveResult
from connectors.vllm.copies import BlockCopier
from connectors.vllm.host_copy import HostCopier
from connectors.vllm.scheduler import (
    CacheLayout,
    CacheServiceMeta,
    Gate,
    LoadSpec,
    SaveSpec,
    Settings,
)
from connectors.vllm.transfer import CudaLayerLoad, CudaSave, pin_arena, prefault
from index.hashing import spot_checksum

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


def _digests(arena: ArenaView, slots: list[int], length: int) -> list[int]:
    return [xxhash.xxh3_64_intdigest(arena.payload(s, length)) for s in slots]


def _leading_matches(got: list[int], want: list[int]) -> int:
    n = 0
    while n < len(got) and got[n] == want[n]:
        n += 1
    return n


@dataclass
class _StepLoad:
    load: CudaLayerLoad | None  # None: the copies are done (a CPU cache, loaded in place)
    loads: list[LoadSpec]
    loaded: set[int]  # engine blocks that verified and are being copied in
    leases: list[str]


class WorkerSide:
    def __init__(self, settings: Settings, layout: CacheLayout, tp_rank: int, num_blocks: int):
        self.layout, self.rank, self.num_blocks = layout, tp_rank, num_blocks
        self.ns = layout.namespaces[tp_rank]
        self.client = CacheClient(settings.url, settings.token, timeout=settings.timeout_s)
        # Loads run inside an engine step: their calls get a short timeout of their own.
        self.step_client = CacheClient(
            settings.url, settings.token, timeout=settings.step_timeout_s
        )
        self.gate = Gate(settings.retry_s, self.client.health)
        self._copier: BlockCopier | None = None  # set by register_kv_caches
        self._host: HostCopier | None = None  # a CPU cache with dense pages
        self._arena: ArenaClient | None = None
        self._arena_lock = threading.Lock()
        self._pinned: dict[int, bool] = {}  # id(arena view) -> registered with CUDA
        self._layer_index = {name: i for i, name in enumerate(layout.layers)}
        self._step: _StepLoad | None = None  # this step's loads, until every layer is in
        self._load_errors: set[int] = set()
        # The second thread of a copy or of a verify, while the engine's thread does the rest.
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cs-copy")
        # Commits (spot checksums, a GPU save's full ones, HTTP) run here, in order, off the step.
        self._commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cs-commit")
        self.stats = {"loaded_blocks": 0, "failed_blocks": 0, "saved_blocks": 0}
        self.stats |= {"load_s": 0.0, "acquire_s": 0.0, "verify_s": 0.0, "copy_in_s": 0.0}
        self.stats |= {"save_s": 0.0, "reserve_s": 0.0, "copy_out_s": 0.0, "commit_s": 0.0}

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
        storages = {t.untyped_storage().data_ptr(): t for t in layers if not t.is_cuda}
        for t in storages.values():
            prefault(t)
        self._copier = BlockCopier(layers, self.layout.layer_bytes)
        rows = self._copier.rows_np
        self._host = None if rows is None else HostCopier(rows, self._helper)

    # -- the data plane -------------------------------------------------------------------

    def _arena_view(self) -> ArenaView:
        with self._arena_lock:
            if self._arena is None:
                info = self.client.register(self.ns, self.layout.block_bytes)
                self._arena = ArenaClient(info.arena["path"])
            view = self._arena.current()  # remapped if a restarted service replaced the file
            if self._copier.layers[0].is_cuda and id(view) not in self._pinned:
                self._pinned[id(view)] = pin_arena(view)  # DMA straight from the arena
            return view

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

    def _acquire(self, spec: LoadSpec) -> tuple[str, list[int], list[int]]:
        """Pin ``spec``'s blocks: (lease, slots of the leading blocks the service holds whole,
        the checksums their writers gave)."""
        keys = list(spec.keys[self.rank])
        start = time.perf_counter()
        acq = self._call(self.step_client.acquire, self.ns.id, keys)
        self.stats["acquire_s"] += time.perf_counter() - start
        found = []
        for slot, length in zip(acq.slots[: len(keys)], acq.lengths, strict=False):
            if length != self.layout.block_bytes:
                break
            found.append(slot)
        return acq.lease, found, list(acq.checksums[: len(found)])

    def _digests(self, arena: ArenaView, slots: list[int]) -> list[int]:
        """xxh3_64 of the slots' payloads, in the arena (a GPU cache verifies before its
        copies are enqueued). xxh3 releases the GIL: the halves hash on two cores."""
        n = self.layout.block_bytes
        half = len(slots) // 2 if len(slots) >= 8 else 0
        rest = self._helper.submit(_digests, arena, slots[half:], n) if half else None
        sums = _digests(arena, slots[:half] if half else slots, n)
        return sums + (rest.result() if rest else [])

    def _copy_in(self, arena: ArenaView, got: list[tuple[LoadSpec, list[int], list[int]]]):
        """Each request's leading blocks whose bytes match their checksums go into the engine
        (a CPU cache: now; a GPU cache: on the side stream); (the GPU load or None, the engine
        blocks that loaded)."""
        start = time.perf_counter()
        slots = [s for _, found, _ in got for s in found]
        blocks = [b for spec, found, _ in got for b in spec.block_ids[: len(found)]]
        if self._host is not None:  # copies every block, then keeps those that verified
            digests = self._host.load(self._copier.host_slots_np(arena), slots, blocks)
        else:
            digests = self._digests(arena, slots)
        good_slots: list[int] = []
        good_blocks: list[int] = []
        at = 0
        for spec, found, sums in got:
            good = _leading_matches(digests[at : at + len(found)], sums)
            if good < len(found):
                key = spec.keys[self.rank][good].hex()
                log.warning("block %s failed its checksum, recomputing", key)
            good_slots += found[:good]
            good_blocks += spec.block_ids[:good]
            at += len(found)
        # A CPU cache's copy and verify are one pass: its time counts as the copy's.
        self.stats["copy_in_s" if self._host else "verify_s"] += time.perf_counter() - start
        if self._host is not None:
            return None, good_blocks
        plan = self._copier.plan(good_slots, good_blocks)
        if self._copier.layers[0].is_cuda:
            return CudaLayerLoad(self._copier, arena, plan), good_blocks
        self._copier.copy(arena, plan, into_cache=True)  # pages that are not dense
        return None, good_blocks

    def _begin(self, loads: list[LoadSpec]) -> None:
        """Acquire every load of this step on the engine's thread (the step needs them before
        its first attention layer anyway), then copy and verify them."""
        start = time.perf_counter()
        leases: list[str] = []
        got: list[tuple[LoadSpec, list[int], list[int]]] = []
        try:
            arena = self._arena_view()
            for spec in loads:
                try:
                    lease, found, sums = self._acquire(spec)
                except ServiceUnavailable as e:
                    self.gate.failed(e)
                    break  # the rest would wait for the same dead service: recompute them
                except CacheServiceError as e:
                    log.error("cacheservice refused a load, recomputing: %s", e)
                    continue
                leases += [lease] if lease else []  # an acquire that found nothing has no lease
                got.append((spec, found, sums))
            load, blocks = self._copy_in(arena, got)
            self._step = _StepLoad(load, loads, set(blocks), leases)
        except ServiceUnavailable as e:  # no arena: the service went away
            self.gate.failed(e)
            self._fail(loads, leases)
        except Exception:  # a bug must not take the engine down: recompute instead
            log.exception("loading %d requests failed, recomputing", len(loads))
            self._fail(loads, leases)
        finally:
            self.stats["load_s"] += time.perf_counter() - start

    def _fail(self, loads: list[LoadSpec], leases: list[str]) -> None:
        failed = [b for spec in loads for b in spec.block_ids]
        self._load_errors.update(failed)
        self.stats["failed_blocks"] += len(failed)
        if leases:
            self._commits.submit(self._release, leases)

    def _release(self, leases: list[str]) -> None:
        for lease in leases:
            try:
                self.client.release(lease)
            except CacheServiceError as e:  # the lease expires on its own
                log.info("release failed: %s", e)

    def start_load_kv(self, meta: CacheServiceMeta) -> None:
        self._finish_loads()
        if not meta.loads:
            return
        if not self.gate.open:  # recompute every block without touching the service
            self._fail(meta.loads, [])
            return
        self._begin(meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Return once this step's loads have put this layer's blocks in place."""
        i = self._layer_index.get(layer_name)
        if self._step is not None and self._step.load is not None and i is not None:
            start = time.perf_counter()
            try:
                self._step.load.wait(i)
            except Exception:
                log.exception("copying layer %s failed, recomputing", layer_name)
                self._abandon()
            self.stats["copy_in_s"] += time.perf_counter() - start

    def _finish_loads(self) -> None:
        """Every layer in place (or the step's loads failed); the leases go back off the step."""
        step = self._step
        if step is None:
            return
        start = time.perf_counter()
        try:
            if step.load is not None:
                step.load.finish()
        except Exception:
            log.exception("finishing a load failed, recomputing")
            self._abandon()
            return
        finally:
            self.stats["copy_in_s"] += time.perf_counter() - start
        self._step = None
        failed = [b for spec in step.loads for b in spec.block_ids if b not in step.loaded]
        self._load_errors.update(failed)
        self.stats["loaded_blocks"] += len(step.loaded)
        self.stats["failed_blocks"] += len(failed)
        if step.leases:  # only frees pins early: they expire anyway
            self._commits.submit(self._release, step.leases)

    def _abandon(self) -> None:
        step, self._step = self._step, None
        if step is not None:
            self._fail(step.loads, step.leases)

    def get_finished(self) -> set[str] | None:
        return None  # loads are synchronous: done within their step

    def take_load_errors(self) -> set[int]:
        self._finish_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- saves ----------------------------------------------------------------------------

    def _save(self, spec: SaveSpec) -> None:
        """Copy the request's new blocks into reserved slots now (vLLM may reuse its blocks
        once the step ends); checksum and commit them on the save thread, off the step."""
        keys = list(spec.keys[self.rank])
        start = time.perf_counter()
        res = self._call(self.step_client.reserve, self.ns.id, keys, spec.parents[self.rank])
        copy = time.perf_counter()
        self.stats["reserve_s"] += copy - start
        if not res.lease:
            return  # nothing to store: all held already, or no room
        # Mapped after the reserve: the arena that gave these slots. Should it have been
        # replaced anyway, the checksums of what we wrote will not match the slots' bytes and
        # the service publishes nothing.
        arena = self._arena_view()
        pairs = [(s, b) for s, b in zip(res.slots, spec.block_ids, strict=False) if s is not None]
        slots, blocks = [s for s, _ in pairs], [b for _, b in pairs]
        copying, sums = None, None
        if self._host is not None:  # the copy computes the checksums
            sums = iter(self._host.save(self._copier.host_slots_np(arena), slots, blocks))
        elif self._copier.layers[0].is_cuda:
            copying = CudaSave(self._copier, arena, self._copier.plan(slots, blocks))
        else:
            self._copier.save(arena, slots, blocks)
        self.stats["copy_out_s"] += time.perf_counter() - copy
        if sums is not None:  # back in the reserve's order, None where nothing was written
            sums = [None if s is None else next(sums) for s in res.slots]
        self._commits.submit(self._commit, arena, res, copying, sums)

    def _commit(
        self, arena: ArenaView, res: ReserveResult, copying: CudaSave | None, sums: list | None
    ) -> None:
        start = time.perf_counter()
        try:
            if copying is not None:
                copying.done()
            n = self.layout.block_bytes
            views = [None if s is None else arena.payload(s, n) for s in res.slots]
            # The full hash is what readers verify; the service checks only the spots.
            if sums is None:
                sums = [None if v is None else xxhash.xxh3_64_intdigest(v) for v in views]
            spots = [None if v is None else spot_checksum(v) for v in views]
            self.stats["saved_blocks"] += self.client.commit(
                res.lease, [s is not None for s in res.slots], sums, spots
            )
            self.stats["commit_s"] += time.perf_counter() - start
        except ServiceUnavailable as e:
            self.gate.failed(e)
        except Exception as e:  # a refused commit only loses a future hit
            log.error("cacheservice commit skipped: %r", e)

    def wait_for_save(self, meta: CacheServiceMeta) -> None:
        self._finish_loads()  # the forward has run: every layer landed already
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
        self._commits.shutdown(wait=True)  # committed blocks reach the service before exit
        self._helper.shutdown(wait=True)
        self.client.close()
        self.step_client.close()
