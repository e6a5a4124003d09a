"""The host arena's slot protocol, as leases drive it: reserve slots for a writer, publish
them on commit, pin blocks for a reader. Leases (cacheservice/leases.py) only keep the
bookkeeping of who holds what and until when; every change of a slot happens here.

Contract:
- ``reserve`` hands out free slots (evicting LRU blocks to make room, never the ones named in
  ``keep``); they are invisible to readers until ``commit`` or ``abort``.
- ``commit`` checksums each slot; a slot whose bytes differ from what its writer said it
  wrote (a late writer of an expired lease, a replaced arena) is freed, not published.
- ``pin_for_read`` promotes each block into host and pins it: its slot and bytes stay put
  until ``unpin``. It stops at the first block that cannot be read or is of another
  namespace (a miss from there on).
- ``hold_until`` (monotonic time) on ``abort``/``unpin``: the holder's lease expired and it
  may still touch the slot, so the slot cools until then before anyone else gets it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

from index.hashing import spot_checksum
from index.radix import Node
from tiers.base import BlockMeta, checksum

if TYPE_CHECKING:
    from tiers.stack import TierStack

OFFLOOP_CHECKSUM_BYTES = 4 << 20  # checksum bigger batches in a worker thread


async def checksums(views: Sequence[memoryview]) -> list[int]:
    if sum(len(v) for v in views) >= OFFLOOP_CHECKSUM_BYTES:
        return await asyncio.to_thread(lambda: [checksum(v) for v in views])
    return [checksum(v) for v in views]


class ReadPins(NamedTuple):
    pins: list[Node]  # handles for ``unpin``
    slots: list[int]
    checksums: list[int]
    lengths: list[int]


class Commit(NamedTuple):
    slot: int
    meta: BlockMeta  # checksum filled in here
    expected: int | None  # the writer's checksum of what it wrote, if it said
    spot: int | None = None  # the writer's index.hashing.spot_checksum of it, if it said


class HostSlots:
    def __init__(self, stack: TierStack) -> None:
        self.stack = stack
        self.host = stack.host
        self.tree = stack.tree
        self.fenced = 0  # committed slots whose bytes were not what their writer wrote

    @property
    def num_slots(self) -> int:
        return self.host.num_slots

    def is_stored(self, key: bytes) -> bool:
        return self.tree.get(key) is not None

    async def reserve(self, count: int, keep: Sequence[bytes], evict: bool = True) -> list[int]:
        """Up to ``count`` free slots. ``keep``: blocks the writer chains from, which stay
        (evicting a prompt's own head to make room for its tail would leave nothing to hit).
        ``evict`` False: only slots free already (a write no prefix lookup can reach)."""
        if evict:
            own = self.tree.pin(keep, touch=False)
            try:
                await self.stack.host_slots(count)
            finally:
                self.tree.unpin_nodes(own)
        slots: list[int] = []
        while len(slots) < count and (slot := self.host.alloc()) is not None:
            slots.append(slot)
        # Ascending: slots freed together (a prompt evicted, a lease aborted) come back out of
        # the free stack reversed; in order they are runs the writer fills with one strided
        # copy per layer instead of a gather and a scatter per block (3x slower, measured).
        slots.sort()
        return slots

    def abort(self, slot: int, hold_until: float = 0.0) -> None:
        self.host.free(slot, hold_until)

    async def commit(self, items: Sequence[Commit]) -> int:
        """Publish and index each filled slot; returns how many blocks are stored now.

        A writer that gives both checksums has its slot spot-checked (a sample of its pages)
        and its full checksum stored unverified: every reader verifies that one (connectors
        after acquire, tiers on read), so a lie or a scribble the sample missed is a miss,
        never wrong KV, and the commit costs no pass over the bytes. Otherwise the service
        hashes the slot itself and compares."""
        views = [self.host.payload_view(c.slot, c.meta.length) for c in items]
        full = [i for i, c in enumerate(items) if c.spot is None or c.expected is None]
        hashed = dict(zip(full, await checksums([views[i] for i in full]), strict=True))
        stored = 0
        for i, (slot, meta, expected, spot) in enumerate(items):
            if i in hashed:
                csum, good = hashed[i], expected is None or expected == hashed[i]
            else:
                csum, good = expected, spot_checksum(views[i]) == spot
            if not good:
                self.fenced += 1
                self.host.free(slot)
                continue
            meta = replace(meta, checksum=csum)
            self.host.publish(slot, meta)
            stored += await self.stack.published(meta)
        return stored

    async def pin_for_read(self, keys: Sequence[bytes], ns_seed: int) -> ReadPins:
        """Promote and pin the stored blocks ``keys`` (no await between the caller's count
        and the pin: the whole run is pinned first, so promoting block i cannot evict j < i)."""
        pins = self.tree.pin(keys)
        assert len(pins) == len(keys), "a matched block left the index before it was pinned"
        slots: list[int] = []
        sums: list[int] = []
        lengths: list[int] = []
        for key in keys:
            slot = self.host.slot_of(key)
            if slot is None and await self.stack.fetch(key) is not None:
                slot = self.host.slot_of(key)
            meta = self.host.meta_of(key)
            if slot is None or meta is None or meta.ns != ns_seed:
                break  # a failed read, host full of pinned blocks, or another namespace's block
            slots.append(slot)
            sums.append(meta.checksum)
            lengths.append(meta.length)
        self.tree.unpin_nodes(pins[len(slots) :])
        return ReadPins(pins[: len(slots)], slots, sums, lengths)

    def unpin(self, pins: Sequence[Node], hold_until: float = 0.0) -> None:
        if hold_until:
            for node in pins:
                self.host.taint(node.key, hold_until)
        self.tree.unpin_nodes(pins)

    def is_published(self, key: bytes, slot: int) -> bool:
        return self.host.slot_of(key) == slot
