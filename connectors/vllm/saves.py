"""A step's saves: the request's new blocks into slots the service reserved, copied right
after the forward, before vLLM can reuse the blocks, then committed on a thread off the step.

The slots are asked for ahead: ``prepare`` (from ``start_load_kv``, before the forward) sends
the step's reserves on a thread of their own, so the service's answer arrives while the
engine computes and the step waits only for the copy. Called without ``prepare`` (or with
other specs), ``save`` sends them itself, still all at once, so the copy of one request's
blocks overlaps the reserve of the next. A reserve the step does not use is aborted, and so is
one older than ``AHEAD_S`` when the save comes: its lease lives the service's ``lease_ms``
(30 s by default), which a CPU prefill of a long prompt can outlast, and a copy into the slots
of an expired lease is lost (the commit finds no lease). Such a step reserves again, after its
forward, where a reserve's millisecond no longer matters.

A CPU cache's checksums come from the copy itself (host_copy.py); a GPU cache's copies are
enqueued on the side stream and hashed on the commit thread once they are done (transfer.py).
The full xxh3_64 is what every reader verifies; the service itself checks only spot
checksums, so a commit costs it 65 lines per block. The service skips blocks it already
holds (the reserve gives them no slot), and a save the service refuses, or that meets a
failing one, only loses a future hit.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import xxhash

from cacheservice.arena import ArenaView
from cacheservice.errors import CacheServiceError, ServiceUnavailable
from cacheservice.results import ReserveResult
from connectors.vllm.copies import BlockCopier
from connectors.vllm.host_copy import HostCopier
from connectors.vllm.link import ServiceLink
from connectors.vllm.scheduler import SaveSpec
from connectors.vllm.transfer import CudaSave
from index.hashing import spot_checksum

log = logging.getLogger("cacheservice.connectors.vllm")

AHEAD_S = 1.0  # a reserve sent before the forward is used only if the save comes this soon


class Saver:
    def __init__(
        self,
        link: ServiceLink,
        copier: BlockCopier,
        host: HostCopier | None,
        commits: ThreadPoolExecutor,
        reserves: ThreadPoolExecutor,
        stats: dict,
    ) -> None:
        self.link, self.copier, self.host = link, copier, host
        self._commits = commits  # one thread: commits reach the service in order
        self._reserves = reserves  # one thread: a step's reserves, in its saves' order
        self._ahead: tuple[list[SaveSpec], list[Future]] | None = None
        self._ahead_at = 0.0
        self.stats = stats

    def prepare(self, specs: list[SaveSpec]) -> None:
        """Send the reserves of ``specs`` now; ``save(specs)`` uses their answers."""
        self._abandon()
        if specs and self.link.gate.open:
            self._ahead = (specs, [self._reserves.submit(self._reserve, s) for s in specs])
            self._ahead_at = time.monotonic()

    def save(self, specs: list[SaveSpec]) -> None:
        start = time.perf_counter()
        ahead = self._ahead
        fresh = time.monotonic() - self._ahead_at <= AHEAD_S
        if ahead is not None and ahead[0] is specs:
            self._ahead, futures = None, ahead[1]
            if not fresh:  # its lease may have expired under the forward: ask again
                pairs = zip(futures, specs, strict=True)
                futures = [self._reserves.submit(self._renew, f, s) for f, s in pairs]
        else:
            self._abandon()
            if not specs or not self.link.gate.open:
                return
            futures = [self._reserves.submit(self._reserve, s) for s in specs]
        for i, (spec, fut) in enumerate(zip(specs, futures, strict=True)):
            if not self.link.gate.open:
                self._abandon(futures[i:])
                break
            try:
                waited = time.perf_counter()
                res = fut.result()  # bounded by the step client's timeout
                self.stats["reserve_s"] += time.perf_counter() - waited
                if res is not None:
                    self._copy(spec, res)
            except ServiceUnavailable as e:
                self.link.gate.failed(e)
            except Exception as e:  # a refused save, or a bug here, only loses a future hit
                log.error("cacheservice save skipped: %r", e)
        self.stats["save_s"] += time.perf_counter() - start

    def _reserve(self, spec: SaveSpec) -> ReserveResult | None:
        link = self.link
        if not link.gate.open:  # an earlier reserve of the step failed: no second timeout
            return None
        keys = list(spec.keys[link.rank])
        return link.call(link.step_client.reserve, link.ns.id, keys, spec.parents[link.rank])

    def _renew(self, early: Future, spec: SaveSpec) -> ReserveResult | None:
        """The early reserve of ``spec`` given back, then a fresh one (in this order, on the
        reserve thread: the service refuses a key another lease still holds)."""
        try:
            res = early.result()
            if res is not None and res.lease:
                self.link.step_client.release(res.lease)
        except ServiceUnavailable as e:  # no second timeout for the same service
            self.link.gate.failed(e)
            return None
        except CacheServiceError as e:  # a refused early reserve or release: reserve anyway
            log.debug("cacheservice early reserve not given back: %r", e)
        return self._reserve(spec)

    def _abandon(self, futures: list[Future] | None = None) -> None:
        """Abort the leases of reserves no step will fill (the previous step's, by default),
        as each answer arrives, off the step."""
        if futures is None:
            futures, self._ahead = (self._ahead[1] if self._ahead else []), None
        for fut in futures:
            fut.add_done_callback(lambda f: self._commits.submit(self._release, f))

    def _release(self, fut: Future) -> None:
        try:
            res = fut.result()
            if res is not None and res.lease:
                self.link.client.release(res.lease)
        except Exception as e:  # the lease expires on its own
            log.debug("cacheservice reserve not released: %r", e)

    def _copy(self, spec: SaveSpec, res: ReserveResult) -> None:
        if not res.lease:
            return  # nothing to store: all held already, or no room
        copy = time.perf_counter()
        # Mapped after the reserve: the arena that gave these slots. Should it have been
        # replaced anyway, the checksums of what we wrote will not match the slots' bytes and
        # the service publishes nothing.
        arena = self.link.arena()
        pairs = [(s, b) for s, b in zip(res.slots, spec.block_ids, strict=False) if s is not None]
        slots, blocks = [s for s, _ in pairs], [b for _, b in pairs]
        copying, sums = None, None
        if self.host is not None:  # the copy computes the checksums
            sums = iter(self.host.save(self.copier.host_slots_np(arena), slots, blocks))
        elif self.copier.layers[0].is_cuda:
            copying = CudaSave(self.copier, arena, self.copier.plan(slots, blocks))
        else:
            self.copier.save(arena, slots, blocks)
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
            n = self.link.layout.block_bytes
            views = [None if s is None else arena.payload(s, n) for s in res.slots]
            if sums is None:
                sums = [None if v is None else xxhash.xxh3_64_intdigest(v) for v in views]
            spots = [None if v is None else spot_checksum(v) for v in views]
            self.stats["saved_blocks"] += self.link.client.commit(
                res.lease, [s is not None for s in res.slots], sums, spots
            )
            self.stats["commit_s"] += time.perf_counter() - start
        except ServiceUnavailable as e:
            self.link.gate.failed(e)
        except Exception as e:  # a refused commit only loses a future hit
            log.error("cacheservice commit skipped: %r", e)
