"""Leases over host arena slots (PROTOCOL.md acquire / reserve / commit / release).

An acquire lease pins blocks so readers can copy them out of the arena zero copy; a reserve
lease holds allocated, unpublished host slots that the writer fills, then commits or aborts.
A periodic task releases or aborts leases not settled within their ``lease_ms``, so a crashed
engine leaks nothing. Keys reaching this module are already validated by CacheService.

Bounds (one client must not take the arena from the others): a lease lives at most the
service's ``lease_ms`` whatever the client asks; one lease holds at most half of the
arena's slots for writing and three quarters for reading; all reserve leases together hold at
most three quarters of the slots; at most ``max_leases`` are open. A request that gets
nothing opens no lease.

Fencing: a holder whose lease expired may still be copying. Its slots cool (are not handed
out again) for ``lease_ms``; a writer states the checksum of what it wrote at commit, and a
slot whose bytes differ (another writer's late bytes) is not published. Readers verify the
checksum acquire gave them, so a late write after that is a miss, never wrong KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field, replace

from cacheservice.errors import BadRequest, Overloaded
from cacheservice.results import AcquireResult, ReserveResult
from index.hashing import Namespace
from index.radix import Node, PrefixTree
from tiers.base import BlockMeta, checksum
from tiers.host import HostTier
from tiers.stack import TierStack

log = logging.getLogger("cacheservice.service")  # the name operators already filter on
OFFLOOP_CHECKSUM_BYTES = 4 << 20  # checksum bigger batches in a worker thread


@dataclass
class Lease:
    id: str
    deadline: float
    pins: list[Node] = field(default_factory=list)  # acquire: pinned nodes
    metas: list[BlockMeta | None] = field(default_factory=list)  # reserve: block to publish
    slots: list[int | None] = field(default_factory=list)  # reserve: slot per block


async def checksums(views: list[memoryview]) -> list[int]:
    if sum(len(v) for v in views) >= OFFLOOP_CHECKSUM_BYTES:
        return await asyncio.to_thread(lambda: [checksum(v) for v in views])
    return [checksum(v) for v in views]


class LeaseTable:
    """Every open lease. Invariant: ``reserving`` maps exactly the keys whose slots an open
    reserve lease holds, so two writers never fill a slot for the same block."""

    def __init__(
        self,
        host: HostTier,
        tree: PrefixTree,
        stack: TierStack,
        lease_ms: int,
        max_leases: int = 4096,
    ) -> None:
        self.host = host
        self.tree = tree
        self.stack = stack
        self.lease_ms = lease_ms
        self.max_leases = max_leases
        self.max_write_slots = max(1, host.num_slots // 2)
        self.max_read_slots = max(1, host.num_slots * 3 // 4)
        self.max_reserved = max(1, host.num_slots * 3 // 4)
        self.fenced = 0  # committed slots whose bytes were not what their writer wrote
        self.leases: dict[str, Lease] = {}
        self.reserving: dict[bytes, str] = {}  # key -> write lease holding a slot for it
        self._expiry: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.leases)

    def deadline(self, lease_ms: int | None) -> float:
        ms = self.lease_ms if lease_ms is None else lease_ms
        if ms <= 0:
            raise BadRequest(f"lease_ms must be positive, got {ms}")
        return time.monotonic() + min(ms, self.lease_ms) / 1000

    def _new(self, deadline: float, pins: list[Node] | None = None) -> Lease:
        if len(self.leases) >= self.max_leases:
            raise Overloaded(
                f"{len(self.leases)} leases are open (max_leases={self.max_leases}): release "
                "leases when done with them, or retry after some expire"
            )
        return Lease(secrets.token_hex(8), deadline, pins=pins or [])

    @property
    def reserved_slots(self) -> int:
        return len(self.reserving)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        period = max(0.05, min(1.0, self.lease_ms / 4000))
        self._expiry = asyncio.create_task(self._expire_loop(period), name="cacheservice-leases")

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
            self._expiry = None
        for lease_id in list(self.leases):
            self.release(lease_id)

    # -- acquire / release ------------------------------------------------------------------

    async def acquire(self, ns_seed: int, hit_keys: list[bytes], deadline: float) -> AcquireResult:
        """Lease the matched prefix ``hit_keys``, promoting each block into host."""
        hit_keys = hit_keys[: self.max_read_slots]
        if not hit_keys:
            return AcquireResult("", [], [], [])
        lease = self._new(deadline)
        # Pin the whole hit first so promoting block i cannot evict block j < i.
        pins = self.tree.pin(hit_keys)
        slots: list[int] = []
        sums: list[int] = []
        lengths: list[int] = []
        for key in hit_keys:
            slot = self.host.slot_of(key)
            if slot is None and await self.stack.fetch(key) is not None:
                slot = self.host.slot_of(key)
            meta = self.host.meta_of(key)
            if slot is None or meta is None or meta.ns != ns_seed:
                break  # a failed read, host full of pinned blocks, or another namespace's block
            slots.append(slot)
            sums.append(meta.checksum)
            lengths.append(meta.length)
        assert len(pins) == len(hit_keys), "a matched block left the index before it was pinned"
        self.tree.unpin_nodes(pins[len(slots) :])
        if not slots:
            return AcquireResult("", [], [], [])
        lease.pins = pins[: len(slots)]
        self.leases[lease.id] = lease
        return AcquireResult(lease.id, slots, sums, lengths)

    def release(self, lease: str, hold_until: float = 0.0) -> int:
        """Unpin an acquire lease, or abort a reserve lease (its slots are freed). An unknown
        or already expired lease releases nothing. ``hold_until``: the holder may still touch
        the slots (its lease expired), so they cool until then before reuse."""
        held = self.leases.pop(lease, None)
        if held is None:
            return 0
        if hold_until:
            for node in held.pins:
                self.host.taint(node.key, hold_until)
        self.tree.unpin_nodes(held.pins)
        freed = 0
        for meta, slot in zip(held.metas, held.slots, strict=True):
            if slot is not None:
                self.host.free(slot, hold_until)
                self.reserving.pop(meta.key, None)
                freed += 1
        return len(held.pins) + freed

    # -- reserve / commit -------------------------------------------------------------------

    async def reserve(
        self, namespace: Namespace, block_bytes: int, keys: list[bytes], parent: bytes
    ) -> ReserveResult:
        lease = self._new(self.deadline(None))
        seen: set[bytes] = set()
        new = []
        for i, key in enumerate(keys):
            if key not in seen and key not in self.reserving and self.tree.get(key) is None:
                new.append(i)
            seen.add(key)
        room = self.max_reserved - len(self.reserving)
        new = new[: max(0, min(self.max_write_slots, room))]
        if not new:
            return ReserveResult("", [None] * len(keys))
        # The blocks this writer chains from stay: evicting a prompt's own head to make room
        # for its tail would leave nothing to hit.
        own = self.tree.pin([parent, *keys], touch=False)
        try:
            await self.stack.host_slots(len(new))
        finally:
            self.tree.unpin_nodes(own)
        lease.slots = [None] * len(keys)
        lease.metas = [None] * len(keys)
        for i in new:
            slot = self.host.alloc()
            if slot is None:
                break
            lease.slots[i] = slot
            prev = keys[i - 1] if i else parent
            lease.metas[i] = BlockMeta(namespace.seed, keys[i], prev, block_bytes, 0)
            self.reserving[keys[i]] = lease.id
        if all(slot is None for slot in lease.slots):
            return ReserveResult("", list(lease.slots))
        self.leases[lease.id] = lease
        return ReserveResult(lease.id, list(lease.slots))

    async def commit(
        self, lease: str, ok: list[bool] | None = None, sums: list[int | None] | None = None
    ) -> int:
        """Publish the filled slots of a reserve lease; returns how many blocks it stored.
        ``sums[i]``: the xxh3_64 of the bytes the writer put in slot i; a slot holding other
        bytes (a late writer of an expired lease scribbled on it) is freed, not published."""
        held = self.leases.get(lease)
        if held is None or held.pins:
            return 0  # expired (already aborted) or not a reserve lease: nothing stored
        for name, given in (("ok", ok), ("checksums", sums)):
            if given is not None and len(given) != len(held.slots):
                raise BadRequest(
                    f"{name} has {len(given)} entries but the lease reserved "
                    f"{len(held.slots)} blocks: send one entry per reserved key"
                )
        del self.leases[lease]
        todo: list[tuple[BlockMeta, int, int | None]] = []
        for i, (meta, slot) in enumerate(zip(held.metas, held.slots, strict=True)):
            if slot is None:
                continue
            self.reserving.pop(meta.key, None)
            if ok is None or ok[i]:
                todo.append((meta, slot, None if sums is None else sums[i]))
            else:
                self.host.free(slot)
        views = [self.host.payload_view(slot, meta.length) for meta, slot, _ in todo]
        found = await checksums(views)
        stored = 0
        for (meta, slot, want), csum in zip(todo, found, strict=True):
            if want is not None and want != csum:
                self.fenced += 1
                self.host.free(slot)
                continue
            meta = replace(meta, checksum=csum)
            self.host.publish(slot, meta)
            stored += await self.stack.published(meta)
        return stored

    # -- expiry -----------------------------------------------------------------------------

    def expire(self, now: float | None = None) -> int:
        """Release (acquire) or abort (reserve) every lease past its deadline."""
        now = time.monotonic() if now is None else now
        expired = [lid for lid, lease in self.leases.items() if lease.deadline <= now]
        hold_until = time.monotonic() + self.lease_ms / 1000
        for lid in expired:
            self.release(lid, hold_until)
        return len(expired)

    async def _expire_loop(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                if n := self.expire():
                    log.info("expired %d leases", n)

    def check_integrity(self) -> None:
        reserved: dict[bytes, str] = {}
        for lid, lease in self.leases.items():
            assert all(n.pins > 0 for n in lease.pins), f"lease {lid} holds an unpinned node"
            assert not (lease.pins and lease.slots), f"lease {lid} both reads and writes"
            for meta, slot in zip(lease.metas, lease.slots, strict=True):
                if slot is not None:
                    assert self.host.slot_of(meta.key) != slot, f"slot {slot} reserved+published"
                    reserved[meta.key] = lid
        assert reserved == self.reserving, "reserving map drifted from the leases"
