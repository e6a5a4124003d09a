"""Leases over host arena slots (PROTOCOL.md acquire / reserve / commit / release).

An acquire lease pins blocks so readers can copy them out of the arena zero copy; a reserve
lease holds allocated, unpublished host slots that the writer fills, then commits or aborts.
A periodic task releases or aborts leases not settled within their ``lease_ms``, so a crashed
engine leaks nothing. Keys reaching this module are already validated by CacheService. Slots
change only through tiers.slots.HostSlots; this module keeps who holds what until when.

Bounds (one client must not take the arena from the others): a lease lives at most the
service's ``lease_ms`` whatever the client asks; one lease holds at most half of the arena's
slots for writing and three quarters for reading; all reserve leases together hold at most
three quarters of the slots, and all acquire leases together pin at most three quarters; at
most ``max_leases`` are open. A request that gets nothing opens no lease.

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
from dataclasses import dataclass, field

from cacheservice.errors import BadRequest, Overloaded
from cacheservice.results import AcquireResult, ReserveResult
from index.hashing import ROOT_KEY, Namespace
from index.radix import Node
from tiers.base import BlockMeta
from tiers.slots import Commit, HostSlots

log = logging.getLogger("cacheservice.service")  # the name operators already filter on


@dataclass
class Lease:
    id: str
    deadline: float
    pins: list[Node] = field(default_factory=list)  # acquire: pinned nodes
    metas: list[BlockMeta | None] = field(default_factory=list)  # reserve: block to publish
    slots: list[int | None] = field(default_factory=list)  # reserve: slot per block


class LeaseTable:
    """Every open lease. Invariant: ``reserving`` maps exactly the keys whose slots an open
    reserve lease holds, so two writers never fill a slot for the same block."""

    def __init__(self, slots: HostSlots, lease_ms: int, max_leases: int = 4096) -> None:
        self.slots = slots
        self.lease_ms = lease_ms
        self.max_leases = max_leases
        self.max_write_slots = max(1, slots.num_slots // 2)
        self.max_read_slots = max(1, slots.num_slots * 3 // 4)
        self.pinned = 0  # pins held by all acquire leases (a block pinned twice counts twice)
        self.max_reserved = max(1, slots.num_slots * 3 // 4)
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

    @property
    def fenced(self) -> int:
        return self.slots.fenced

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
        # All readers together may pin at most max_read_slots: writers always find room.
        hit_keys = hit_keys[: max(0, self.max_read_slots - self.pinned)]
        if not hit_keys:
            return AcquireResult("", [], [], [])
        lease = self._new(deadline)
        read = await self.slots.pin_for_read(hit_keys, ns_seed)
        if not read.slots:
            return AcquireResult("", [], [], [])
        lease.pins = read.pins
        self.pinned += len(read.pins)
        self.leases[lease.id] = lease
        return AcquireResult(lease.id, read.slots, read.checksums, read.lengths)

    def release(self, lease: str, hold_until: float = 0.0) -> int:
        """Unpin an acquire lease, or abort a reserve lease (its slots are freed). An unknown
        or already expired lease releases nothing. ``hold_until``: the holder may still touch
        the slots (its lease expired), so they cool until then before reuse."""
        held = self.leases.pop(lease, None)
        if held is None:
            return 0
        self.slots.unpin(held.pins, hold_until)
        self.pinned -= len(held.pins)
        freed = 0
        for meta, slot in zip(held.metas, held.slots, strict=True):
            if slot is not None:
                self.slots.abort(slot, hold_until)
                self.reserving.pop(meta.key, None)
                freed += 1
        return len(held.pins) + freed

    # -- reserve / commit -------------------------------------------------------------------

    async def reserve(
        self,
        namespace: Namespace,
        block_bytes: int,
        keys: list[bytes],
        parent: bytes,
        chunk: bool = False,
    ) -> ReserveResult:
        lease = self._new(self.deadline(None))
        seen: set[bytes] = set()
        new = []
        for i, key in enumerate(keys):
            if key not in seen and key not in self.reserving and not self.slots.is_stored(key):
                new.append(i)
            seen.add(key)
        room = self.max_reserved - len(self.reserving)
        new = new[: max(0, min(self.max_write_slots, room))]
        if not new:
            return ReserveResult("", [None] * len(keys))
        # A chain whose parent is neither the root nor stored nor being written can never be
        # reached by a prefix lookup (the writer missed a block): it must not evict anything.
        # A chunk's chain hangs off its chunk key, which the chunk index (not the tree) finds.
        anchored = chunk or parent == ROOT_KEY or parent in self.reserving
        anchored = anchored or self.slots.is_stored(parent)
        granted = await self.slots.reserve(len(new), [parent, *keys], evict=anchored)
        lease.slots = [None] * len(keys)
        lease.metas = [None] * len(keys)
        seed = namespace.seed
        for i, slot in zip(new, granted, strict=False):
            lease.slots[i] = slot
            prev = keys[i - 1] if i else parent
            lease.metas[i] = BlockMeta(seed, keys[i], prev, block_bytes, 0)
            self.reserving[keys[i]] = lease.id
        if all(slot is None for slot in lease.slots):
            return ReserveResult("", list(lease.slots))
        self.leases[lease.id] = lease
        return ReserveResult(lease.id, list(lease.slots))

    async def commit(
        self,
        lease: str,
        ok: list[bool] | None = None,
        sums: list[int | None] | None = None,
        spots: list[int | None] | None = None,
    ) -> int:
        """Publish the filled slots of a reserve lease; returns how many blocks it stored.
        ``sums[i]``: the xxh3_64 of the bytes the writer put in slot i; a slot holding other
        bytes (a late writer of an expired lease scribbled on it) is freed, not published."""
        held = self.leases.get(lease)
        if held is None or held.pins:
            return 0  # expired (already aborted) or not a reserve lease: nothing stored
        for name, given in (("ok", ok), ("checksums", sums), ("spots", spots)):
            if given is not None and len(given) != len(held.slots):
                raise BadRequest(
                    f"{name} has {len(given)} entries but the lease reserved "
                    f"{len(held.slots)} blocks: send one entry per reserved key"
                )
        del self.leases[lease]
        todo: list[Commit] = []
        for i, (meta, slot) in enumerate(zip(held.metas, held.slots, strict=True)):
            if slot is None:
                continue
            self.reserving.pop(meta.key, None)
            if ok is None or ok[i]:
                expected = None if sums is None else sums[i]
                todo.append(Commit(slot, meta, expected, None if spots is None else spots[i]))
            else:
                self.slots.abort(slot)
        return await self.slots.commit(todo)

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
                    published = self.slots.is_published(meta.key, slot)
                    assert not published, f"slot {slot} reserved+published"
                    reserved[meta.key] = lid
        assert reserved == self.reserving, "reserving map drifted from the leases"
        assert self.pinned == sum(len(lease.pins) for lease in self.leases.values()), "pins"
