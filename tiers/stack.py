"""The tier stack: host arena on top, lower tiers (disk, Redis) below, one PrefixTree as the
truth of which tier holds which block.

Invariants:
- Writes land in host; a background task writes every new block down to each lower tier
  (bounded queue, so a slow tier applies back-pressure instead of growing memory).
- A block leaves a tier only after it is safe in another tier, or it drops from the index
  (a last copy is first copied one tier down; without a tier below, only leaves may go).
- A read that fails is a miss. A corrupt block is gone from its tier (the tier deleted it), so
  its residency leaves the tree; after a mere I/O error the tier still holds the block and the
  tree keeps it (``Tier.contains`` tells which).
- Input from clients and media is untrusted: an edge the tree refuses (a cycle, a block that
  is its own parent) is not stored, and a header that names one is skipped and counted.
- Shared tiers are asked about unknown keys within a short budget (shared.py).
- The tree is mutated only on the event loop; every await re-checks the node it works on.
  Blocks read zero copy from host are pinned while the read is in flight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from index.radix import PrefixTree
from tiers.base import FLAG_MANIFEST, Block, BlockMeta, Tier
from tiers.host import HostTier
from tiers.rates import ReadRates
from tiers.rebuild import rebuild_index
from tiers.shared import SharedLookup
from tiers.slots import HostSlots
from tiers.writedown import WriteDown

log = logging.getLogger("cacheservice.stack")


@dataclass
class StackCounters:
    evictions: int = 0  # tier copies removed to make room
    dropped: int = 0  # blocks that left the index for good (last copy evicted)
    failed_reads: int = 0  # reads that came back empty (corrupt, I/O error or gone)
    refused: int = 0  # blocks not stored: the edge would break the tree (cycle, self-parent)
    promotions: int = 0
    written_down: int = 0
    remote_timeouts: int = 0  # shared-tier lookups that ran past the lookup budget


class TierStack:
    def __init__(
        self, host: HostTier, lower: Sequence[Tier], tree: PrefixTree, *, queue_size: int = 4096
    ) -> None:
        names = [t.name for t in (host, *lower)]
        assert len(set(names)) == len(names), f"tier names must be unique: {names}"
        self.host = host
        self.lower = list(lower)
        self.tiers: list[Tier] = [host, *lower]
        self.tree = tree
        self.counters = StackCounters()
        # Called with each key that stops being a stored block (chunks that use it go too).
        self.on_dropped: Callable[[bytes], None] | None = None
        self.read_rates = ReadRates()  # learnt from the reads below host (routing costs)
        self.remote = SharedLookup(self.lower, tree, self.counters)
        self._writedown = WriteDown(self, queue_size) if self.lower else None
        self.slots = HostSlots(self)
        self._closed = False

    async def start(self) -> None:
        for tier in self.tiers:
            await tier.start()
        if self._writedown is not None:
            self._writedown.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.remote.close()
        if self._writedown is not None:
            await self._writedown.close()
        for tier in self.tiers:
            await tier.close()

    async def drain(self) -> None:
        """Wait until every queued write-down has finished."""
        if self._writedown is not None:
            await self._writedown.drain()

    # -- writes -----------------------------------------------------------------------------

    async def store(self, meta: BlockMeta, payload: bytes | memoryview, evict: bool = True) -> bool:
        """Copy a block into host (evicting if full and ``evict``, never the block's parent),
        index it and queue its write-down."""
        node = self.tree.get(meta.key)
        if node is not None:
            return True
        if not await self.host.put(meta, payload):
            if not evict:
                return False
            own = self.tree.pin([meta.parent], touch=False)
            try:
                await self.make_room(0, 1)
            finally:
                self.tree.unpin_nodes(own)
            if not await self.host.put(meta, payload):
                return False
        return await self.published(meta)

    async def published(self, meta: BlockMeta) -> bool:
        """A block just became visible in host (put or reserve/commit): index it, write down.
        False when the tree refuses its edge: the host copy is removed again."""
        if not self.tree.insert(meta.parent, meta.key, self.host.name, meta.length):
            self.counters.refused += 1
            await self.host.delete(meta.key)
            return False
        if self._writedown is not None:
            await self._writedown.enqueue(meta.key)
        return True

    async def host_slots(self, wanted: int) -> int:
        """Evict until ``wanted`` host slots are free (or nothing more may go); free slots."""
        short = wanted - self.host.free_slots
        if short > 0:
            await self.make_room(0, short)
        return self.host.free_slots

    async def make_room(self, index: int, count: int) -> int:
        """Remove up to ``count`` LRU copies from tier ``index``; a last copy is first copied
        to a lower tier, else it drops from the index. Returns the copies removed."""
        tier = self.tiers[index]
        # With a tier below, a last copy is copied down before it goes (_evict_one), so blocks
        # that write-down has not reached yet can make room too, internal ones included.
        copy_down = index + 1 < len(self.tiers)
        removed = 0
        tried: set[bytes] = set()
        while removed < count:
            want = count - removed
            candidates = self.tree.evict_candidates(tier.name, want + len(tried), copy_down)
            fresh = [k for k in candidates if k not in tried]
            if not fresh:
                break
            for key in fresh[:want]:
                tried.add(key)
                removed += await self._evict_one(index, key)
        self.counters.evictions += removed
        return removed

    async def _evict_one(self, index: int, key: bytes) -> bool:
        tier = self.tiers[index]
        node = self.tree.get(key)
        if node is None or tier.name not in node.tiers or node.pins:
            return False  # changed while an earlier candidate was awaited
        if len(node.tiers) == 1:
            handles = self.tree.pin([key], touch=False)
            try:
                await self._copy_down(key, index)
            finally:
                self.tree.unpin_nodes(handles)
            node = self.tree.get(key)
            if node is None or tier.name not in node.tiers or node.pins:
                return False
            if len(node.tiers) == 1 and node.children:
                return False  # not copied and no longer a leaf: it must stay
        last = len(node.tiers) == 1
        await tier.delete(key)
        self._remove(key, tier.name)
        self.counters.dropped += last
        return True

    def _remove(self, key: bytes, tier: str) -> None:
        self.tree.remove_tier(key, tier)
        if self.on_dropped is not None and self.tree.get(key) is None:
            self.on_dropped(key)

    async def _copy_down(self, key: bytes, index: int) -> bool:
        if index + 1 >= len(self.tiers):
            return False
        block = await self.tiers[index].get(key)
        if block is None:
            await self.failed_read(key, self.tiers[index])
            return False
        for below in range(index + 1, len(self.tiers)):
            if await self.put_into(below, [(block.meta, block.payload)]) == [True]:
                self.add_tier(key, self.tiers[below].name)
                return True
        return False

    async def put_into(
        self, index: int, items: list[tuple[BlockMeta, bytes | memoryview]]
    ) -> list[bool]:
        tier = self.tiers[index]
        done = await tier.put_many(items)
        failed = [i for i, ok in enumerate(done) if not ok]
        if failed and await self.make_room(index, len(failed)):
            again = await tier.put_many([items[i] for i in failed])
            for i, ok in zip(failed, again, strict=True):
                done[i] = ok
        return done

    def add_tier(self, key: bytes, name: str) -> None:
        if self.tree.get(key) is not None:
            self.tree.add_tier(key, name)

    async def put_manifest(self, meta: BlockMeta, payload: bytes) -> int:
        """Write an index manifest (not a KV block, never in the tree) to every lower tier;
        returns how many tiers hold it now (the disk tier fsyncs it first)."""
        assert meta.flags & FLAG_MANIFEST, "manifests carry FLAG_MANIFEST"
        stored = 0
        for index in range(1, len(self.tiers)):
            stored += (await self.put_into(index, [(meta, payload)]))[0]
        return stored

    async def delete_manifest(self, key: bytes) -> None:
        for tier in self.lower:
            await tier.delete(key)

    # -- reads ------------------------------------------------------------------------------

    async def fetch(self, key: bytes, promote: bool = True) -> Block | None:
        """The block from the fastest tier holding it, checksum verified, or None. A block
        found below host is promoted into host when ``promote`` and room allows; the result
        is then the host copy (zero copy: pin the key while using it)."""
        if self.tree.get(key) is None:
            block = await self.remote.fetch(key)
            if block is None or not promote:
                return block
            return await self._promote(block) or block
        for index, tier in enumerate(self.tiers):
            node = self.tree.get(key)
            if node is None:
                return None
            if tier.name not in node.tiers:
                continue
            if index and promote:
                promoted = await self._promote_from(tier, key)
                if promoted is not None:
                    return promoted
                if (node := self.tree.get(key)) is None or tier.name not in node.tiers:
                    continue
            started = time.perf_counter()
            block = await tier.get(key)
            if block is None:
                await self.failed_read(key, tier)
                continue
            if index:
                self.read_rates.observe(
                    tier.name, len(block.payload), time.perf_counter() - started
                )
            if index and promote:
                return await self._promote(block) or block
            return block
        return None

    async def _promote(self, block: Block) -> Block | None:
        key = block.meta.key
        if not await self.host.put(block.meta, block.payload):
            await self.make_room(0, 1)
            if not await self.host.put(block.meta, block.payload):
                return None
        if self.tree.get(key) is None:  # dropped while we waited: do not leak the slot
            await self.host.delete(key)
            return None
        self.tree.add_tier(key, self.host.name)
        self.counters.promotions += 1
        return await self.host.get(key)

    async def _promote_from(self, tier: Tier, key: bytes) -> Block | None:
        """Read ``key`` from ``tier`` straight into a free host slot and publish it there (one
        copy less than get + put). None when no slot frees up or the read missed; the caller
        then falls back to ``get``, which turns a real miss into a dropped copy."""
        if self.host.free_slots == 0:
            await self.make_room(0, 1)
        slot = self.host.alloc()
        if slot is None:
            return None
        meta = None
        started = time.perf_counter()
        try:
            meta = await tier.get_into(key, self.host.payload_view(slot))
            if meta is not None:
                self.read_rates.observe(tier.name, meta.length, time.perf_counter() - started)
        finally:
            if meta is None or self.tree.get(key) is None:  # failed, or dropped meanwhile
                self.host.free(slot)
        if meta is None or self.tree.get(key) is None:
            return None
        assert meta.key == key, "get_into returned another block's meta"
        self.host.publish(slot, meta)
        self.tree.add_tier(key, self.host.name)
        self.counters.promotions += 1
        return await self.host.get(key)

    async def failed_read(self, key: bytes, tier: Tier) -> None:
        """A read of ``key`` from ``tier`` came back empty. The tier deleted a corrupt block;
        one it still holds only failed to read (an I/O error) and stays indexed."""
        self.counters.failed_reads += 1
        if not await tier.contains(key):
            self._remove(key, tier.name)

    async def rebuild(self) -> list[Block]:
        """Index every block the tiers hold (after a restart); returns the manifest blocks."""
        return await rebuild_index(self.tiers, self.tree, self.remote.tiers)

    def check_integrity(self) -> None:
        """Tree invariants, host accounting, and: every block the tree puts in host is there.
        Call after ``drain`` (lower tiers assert that no write is in flight)."""
        self.tree.check_integrity()
        for tier in self.tiers:
            tier.check_integrity()
        missing = [k for k in self.tree.keys_in(self.host.name) if self.host.slot_of(k) is None]
        assert not missing, f"{len(missing)} indexed host blocks have no slot"
