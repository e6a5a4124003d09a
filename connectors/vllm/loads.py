"""A step's loads: the service's blocks into the engine's KV cache, each verified against the
checksum its writer gave, synchronously (the request runs in the very step its blocks load:
no extra engine steps, as an asynchronous load costs).

``begin`` acquires the step's blocks on the engine's thread (the step needs them before its
first attention layer anyway). A CPU cache is filled there and then, every block checksummed
as it lands (host_copy.py: tiles copied and hashed while cached, on two threads); a GPU
cache's blocks are verified in the arena, then move on a side stream with one event per
layer, so vLLM's ``wait_for_layer_load`` lets the first layers compute while the rest are in
flight (transfer.py). Only the leading blocks of a request that verified are kept; the rest,
and every block of a load that could not be done, are reported through vLLM's failed-block
API (``take_errors``), which recomputes from the first of them.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import xxhash

from cacheservice.arena import ArenaView
from cacheservice.errors import CacheServiceError, ServiceUnavailable
from connectors.vllm.copies import BlockCopier
from connectors.vllm.host_copy import HostCopier
from connectors.vllm.link import ServiceLink
from connectors.vllm.scheduler import LoadSpec
from connectors.vllm.transfer import CudaLayerLoad

log = logging.getLogger("cacheservice.connectors.vllm")


def _digests(arena: ArenaView, slots: list[int], length: int) -> list[int]:
    return [xxhash.xxh3_64_intdigest(arena.payload(s, length)) for s in slots]


def leading_matches(got: list[int], want: list[int]) -> int:
    n = 0
    while n < len(got) and got[n] == want[n]:
        n += 1
    return n


class _Acquired(NamedTuple):
    spec: LoadSpec
    slots: list[int]  # of the leading blocks the service holds whole
    sums: list[int]  # the checksums their writers gave


@dataclass
class _StepLoad:
    load: CudaLayerLoad | None  # None: the copies are done (a CPU cache, loaded in place)
    loads: list[LoadSpec]
    loaded: set[int]  # engine blocks that verified and are being copied in
    leases: list[str]


class Loader:
    """Owns the step's load state between ``begin`` and ``finish``; ``take_errors`` hands
    each failed engine block to vLLM once."""

    def __init__(
        self,
        link: ServiceLink,
        copier: BlockCopier,
        host: HostCopier | None,
        helper: ThreadPoolExecutor,
        background: ThreadPoolExecutor,
        stats: dict,
    ) -> None:
        self.link, self.copier, self.host = link, copier, host
        self.rank = link.rank
        self._helper = helper  # the second thread of a verify
        self._background = background  # lease releases, off the step
        self.stats = stats
        self._step: _StepLoad | None = None  # this step's loads, until every layer is in
        self._errors: set[int] = set()

    def _acquire(self, spec: LoadSpec) -> tuple[str, _Acquired]:
        keys = list(spec.keys[self.rank])
        start = time.perf_counter()
        acq = self.link.call(self.link.step_client.acquire, self.link.ns.id, keys)
        self.stats["acquire_s"] += time.perf_counter() - start
        found = []
        for slot, length in zip(acq.slots[: len(keys)], acq.lengths, strict=False):
            if length != self.link.layout.block_bytes:
                break
            found.append(slot)
        return acq.lease, _Acquired(spec, found, list(acq.checksums[: len(found)]))

    def _digests(self, arena: ArenaView, slots: list[int]) -> list[int]:
        """xxh3_64 of the slots' payloads, in the arena (a GPU cache verifies before its
        copies are enqueued). xxh3 releases the GIL: the halves hash on two cores."""
        n = self.link.layout.block_bytes
        half = len(slots) // 2 if len(slots) >= 8 else 0
        rest = self._helper.submit(_digests, arena, slots[half:], n) if half else None
        sums = _digests(arena, slots[:half] if half else slots, n)
        return sums + (rest.result() if rest else [])

    def _copy_in(self, arena: ArenaView, got: list[_Acquired]):
        """Each request's leading blocks whose bytes match their checksums go into the engine
        (a CPU cache: now; a GPU cache: on the side stream); (the GPU load or None, the engine
        blocks that loaded)."""
        start = time.perf_counter()
        slots = [s for a in got for s in a.slots]
        blocks = [b for a in got for b in a.spec.block_ids[: len(a.slots)]]
        if self.host is not None:  # copies every block, then keeps those that verified
            digests = self.host.load(self.copier.host_slots_np(arena), slots, blocks)
        else:
            digests = self._digests(arena, slots)
        good_slots: list[int] = []
        good_blocks: list[int] = []
        at = 0
        for a in got:
            good = leading_matches(digests[at : at + len(a.slots)], a.sums)
            if good < len(a.slots):
                key = a.spec.keys[self.rank][good].hex()
                log.warning("block %s failed its checksum, recomputing", key)
            good_slots += a.slots[:good]
            good_blocks += a.spec.block_ids[:good]
            at += len(a.slots)
        # A CPU cache's copy and verify are one pass: its time counts as the copy's.
        self.stats["copy_in_s" if self.host else "verify_s"] += time.perf_counter() - start
        if self.host is not None:
            return None, good_blocks
        plan = self.copier.plan(good_slots, good_blocks)
        if self.copier.layers[0].is_cuda:
            return CudaLayerLoad(self.copier, arena, plan), good_blocks
        self.copier.copy(arena, plan, into_cache=True)  # pages that are not dense
        return None, good_blocks

    def begin(self, loads: list[LoadSpec]) -> None:
        """Acquire, copy and verify every load of this step (the previous step's finished)."""
        self.finish()
        if not self.link.gate.open:  # recompute every block without touching the service
            self._fail(loads, [])
            return
        start = time.perf_counter()
        leases: list[str] = []
        got: list[_Acquired] = []
        try:
            arena = self.link.arena()
            for spec in loads:
                try:
                    lease, acquired = self._acquire(spec)
                except ServiceUnavailable as e:
                    self.link.gate.failed(e)
                    break  # the rest would wait for the same dead service: recompute them
                except CacheServiceError as e:
                    log.error("cacheservice refused a load, recomputing: %s", e)
                    continue
                leases += [lease] if lease else []  # an acquire that found nothing has no lease
                got.append(acquired)
            load, blocks = self._copy_in(arena, got)
            self._step = _StepLoad(load, loads, set(blocks), leases)
        except ServiceUnavailable as e:  # no arena: the service went away
            self.link.gate.failed(e)
            self._fail(loads, leases)
        except Exception:  # a bug must not take the engine down: recompute instead
            log.exception("loading %d requests failed, recomputing", len(loads))
            self._fail(loads, leases)
        finally:
            self.stats["load_s"] += time.perf_counter() - start

    def wait_layer(self, layer: int) -> None:
        """Return once this step's loads have put this layer's blocks in place."""
        if self._step is None or self._step.load is None:
            return
        start = time.perf_counter()
        try:
            self._step.load.wait(layer)
        except Exception:
            log.exception("copying layer %d failed, recomputing", layer)
            self._abandon()
        self.stats["copy_in_s"] += time.perf_counter() - start

    def finish(self) -> None:
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
        self._errors.update(failed)
        self.stats["loaded_blocks"] += len(step.loaded)
        self.stats["failed_blocks"] += len(failed)
        if step.leases:  # only frees pins early: they expire anyway
            self._background.submit(self._release, step.leases)

    def take_errors(self) -> set[int]:
        self.finish()
        errors, self._errors = self._errors, set()
        return errors

    def _abandon(self) -> None:
        step, self._step = self._step, None
        if step is not None:
            self._fail(step.loads, step.leases)

    def _fail(self, loads: list[LoadSpec], leases: list[str]) -> None:
        failed = [b for spec in loads for b in spec.block_ids]
        self._errors.update(failed)
        self.stats["failed_blocks"] += len(failed)
        if leases:
            self._background.submit(self._release, leases)

    def _release(self, leases: list[str]) -> None:
        for lease in leases:
            try:
                self.link.client.release(lease)
            except CacheServiceError as e:  # the lease expires on its own
                log.info("release failed: %s", e)
