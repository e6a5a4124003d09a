"""A step's saves: the request's new blocks into slots the service reserved, copied right
after the forward, before vLLM can reuse the blocks, then committed on a thread off the step.

A CPU cache's checksums come from the copy itself (host_copy.py); a GPU cache's copies are
enqueued on the side stream and hashed on the commit thread once they are done (transfer.py).
The full xxh3_64 is what every reader verifies; the service itself checks only spot
checksums, so a commit costs it a few lines per page. The service skips blocks it already
holds (the reserve gives them no slot), and a save the service refuses, or that meets a
failing one, only loses a future hit.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import xxhash

from cacheservice.arena import ArenaView
from cacheservice.errors import ServiceUnavailable
from cacheservice.results import ReserveResult
from connectors.vllm.copies import BlockCopier
from connectors.vllm.host_copy import HostCopier
from connectors.vllm.link import ServiceLink
from connectors.vllm.scheduler import SaveSpec
from connectors.vllm.transfer import CudaSave
from index.hashing import spot_checksum

log = logging.getLogger("cacheservice.connectors.vllm")


class Saver:
    def __init__(
        self,
        link: ServiceLink,
        copier: BlockCopier,
        host: HostCopier | None,
        commits: ThreadPoolExecutor,
        stats: dict,
    ) -> None:
        self.link, self.copier, self.host = link, copier, host
        self._commits = commits  # one thread: commits reach the service in order
        self.stats = stats

    def save(self, specs: list[SaveSpec]) -> None:
        start = time.perf_counter()
        for spec in specs:
            if not self.link.gate.open:
                break
            try:
                self._save(spec)
            except ServiceUnavailable as e:
                self.link.gate.failed(e)
            except Exception as e:  # a refused save, or a bug here, only loses a future hit
                log.error("cacheservice save skipped: %r", e)
        self.stats["save_s"] += time.perf_counter() - start

    def _save(self, spec: SaveSpec) -> None:
        link = self.link
        keys = list(spec.keys[link.rank])
        start = time.perf_counter()
        res = link.call(link.step_client.reserve, link.ns.id, keys, spec.parents[link.rank])
        copy = time.perf_counter()
        self.stats["reserve_s"] += copy - start
        if not res.lease:
            return  # nothing to store: all held already, or no room
        # Mapped after the reserve: the arena that gave these slots. Should it have been
        # replaced anyway, the checksums of what we wrote will not match the slots' bytes and
        # the service publishes nothing.
        arena = link.arena()
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
