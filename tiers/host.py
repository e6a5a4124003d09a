"""The hot tier: a shared-memory arena of fixed-size slots that engines map zero copy.

The arena is a plain file (under /dev/shm by default) mapped with ``mmap``: a 4096-byte arena
header, then ``num_slots`` slots of ``slot_bytes`` each; a slot is a 64-byte BlockMeta header
followed by the payload (PROTOCOL.md, "Arena"). The service process owns allocation and the
key -> slot map; other processes only map the file (ArenaView) and touch slots they were given.
``multiprocessing.shared_memory`` is avoided on purpose: its resource tracker unlinks segments
that other processes created.

Slot states (every slot is in exactly one): free, reserved (handed to a writer, invisible to
get/contains/scan until published), used (published, in the key map), cooling (left by a
lease that expired: its holder may still be copying, so the slot is not handed out again
until ``hold_until``).

One service owns an arena path at a time (tiers/shm.py: the owner lock, the size check, the
file's creation and removal).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import AsyncIterator

import numpy as np

from tiers.base import (
    ARENA_HEADER,
    ARENA_HEADER_BYTES,
    ARENA_MAGIC,
    ARENA_VERSION,
    HEADER_BYTES,
    Block,
    BlockMeta,
    CorruptBlock,
    Tier,
)
from tiers.shm import ArenaError, ArenaInUse, create_arena  # noqa: F401  (re-exported)

DEFAULT_ARENA_PATH = "/dev/shm/cacheservice-arena"
_NO_HEADER = bytes(HEADER_BYTES)


class HostTier(Tier):
    """Blocks in a shared-memory arena. ``get`` is zero copy: the returned payload is a
    memoryview into the slot, valid only while the block is pinned in the index (a delete
    lets the slot be reused). ``put`` copies the payload into a free slot with one memcpy."""

    name = "host"

    def __init__(self, path: str, capacity_bytes: int, slot_bytes: int) -> None:
        super().__init__()
        if slot_bytes <= HEADER_BYTES or slot_bytes % 4096:
            raise ArenaError(
                f"slot_bytes={slot_bytes} must be a multiple of 4096 larger than the "
                f"{HEADER_BYTES}-byte block header: round block_bytes + {HEADER_BYTES} up to 4096"
            )
        if capacity_bytes < slot_bytes:
            raise ArenaError(
                f"host capacity {capacity_bytes} bytes holds no {slot_bytes}-byte slot: "
                "raise the host capacity or lower slot_bytes"
            )
        self.path = path
        self.slot_bytes = slot_bytes
        self.num_slots = capacity_bytes // slot_bytes
        self.data_offset = ARENA_HEADER_BYTES
        self.max_payload = slot_bytes - HEADER_BYTES
        size = self.data_offset + self.num_slots * slot_bytes
        self._owned = create_arena(path, size, slot_bytes, self.data_offset)
        self._map = self._owned.map  # pre-faulted: the header below is the first write
        self._map[:ARENA_HEADER_BYTES] = ARENA_HEADER.pack(
            ARENA_MAGIC, ARENA_VERSION, slot_bytes, self.num_slots, self.data_offset
        ).ljust(ARENA_HEADER_BYTES, b"\0")
        self._view = memoryview(self._map)
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self._free = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._reserved: set[int] = set()
        self._cooling: deque[tuple[float, int]] = deque()  # (reusable at, slot), oldest first
        self._tainted: dict[int, float] = {}  # used slot -> cooling deadline once it is freed
        self._slots: dict[bytes, int] = {}
        self._metas: dict[int, BlockMeta] = {}
        self._closed = False

    # -- layout -----------------------------------------------------------------------------

    def arena_info(self) -> dict:
        return {
            "path": self.path,
            "slot_bytes": self.slot_bytes,
            "num_slots": self.num_slots,
            "data_offset": self.data_offset,
        }

    def _slot_offset(self, slot: int) -> int:
        assert 0 <= slot < self.num_slots, f"slot {slot} outside [0, {self.num_slots})"
        return self.data_offset + slot * self.slot_bytes

    def payload_view(self, slot: int, length: int | None = None) -> memoryview:
        n = self.max_payload if length is None else length
        assert 0 <= n <= self.max_payload, f"length {n} exceeds slot payload {self.max_payload}"
        start = self._slot_offset(slot) + HEADER_BYTES
        return self._view[start : start + n]

    @property
    def free_slots(self) -> int:
        self._reclaim()
        return len(self._free)

    @property
    def cooling_slots(self) -> int:
        self._reclaim()
        return len(self._cooling)

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        return (self.num_slots - len(self._free) - len(self._cooling)) * self.slot_bytes

    # -- writer protocol: alloc -> fill payload_view -> publish (or free) ---------------------

    def _reclaim(self) -> None:
        now = time.monotonic()
        while self._cooling and self._cooling[0][0] <= now:
            self._free.append(self._cooling.popleft()[1])

    def _release(self, slot: int, hold_until: float) -> None:
        hold_until = max(hold_until, self._tainted.pop(slot, 0.0))
        if hold_until > time.monotonic():
            # deadlines arrive nearly in order (insort is then an append); kept sorted so
            # _reclaim can stop at the first slot still cooling
            bisect.insort(self._cooling, (hold_until, slot))
        else:
            self._free.append(slot)

    def taint(self, key: bytes, hold_until: float) -> None:
        """A reader of ``key`` lost its lease and may still be copying: once the block leaves
        the arena, its slot cools until ``hold_until`` before it can be handed out again."""
        slot = self._slots.get(key)
        if slot is not None:
            self._tainted[slot] = max(hold_until, self._tainted.get(slot, 0.0))

    def alloc(self) -> int | None:
        self._reclaim()
        if not self._free:
            return None
        slot = self._free.pop()
        self._reserved.add(slot)
        return slot

    def publish(self, slot: int, meta: BlockMeta) -> None:
        assert slot in self._reserved, f"slot {slot} was not reserved"
        assert meta.length <= self.max_payload, "payload longer than the slot"
        self._reserved.discard(slot)
        if meta.key in self._slots:  # another writer published the same block first
            self._release(slot, 0.0)
            return
        off = self._slot_offset(slot)
        self._map[off : off + HEADER_BYTES] = meta.encode()
        self._slots[meta.key] = slot
        self._metas[slot] = meta

    def free(self, slot: int, hold_until: float = 0.0) -> None:
        """Return a reserved slot; ``hold_until`` (monotonic time) keeps it cooling until then,
        for a writer whose lease expired and who may still write into it."""
        assert slot in self._reserved, f"slot {slot} is not reserved (only reserved slots free)"
        self._reserved.discard(slot)
        self._release(slot, hold_until)

    def slot_of(self, key: bytes) -> int | None:
        return self._slots.get(key)

    def meta_of(self, key: bytes) -> BlockMeta | None:
        slot = self._slots.get(key)
        return None if slot is None else self._metas[slot]

    # -- Tier -------------------------------------------------------------------------------

    async def put(self, meta: BlockMeta, payload: bytes | memoryview) -> bool:
        """False when the arena is full, or the block is longer than a slot (a lower tier
        written under a larger --slot-bytes): a refusal, never an error."""
        assert meta.length == len(payload), "meta.length must equal the payload length"
        if meta.length > self.max_payload:
            return False
        if meta.key in self._slots:
            return True
        slot = self.alloc()
        if slot is None:
            return False
        start = self._slot_offset(slot) + HEADER_BYTES
        self._bytes[start : start + meta.length] = np.frombuffer(payload, dtype=np.uint8)
        self.publish(slot, meta)
        return True

    async def get(self, key: bytes) -> Block | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        meta = self._metas[slot]
        off = self._slot_offset(slot)
        payload = self.payload_view(slot, meta.length)
        try:
            if self._view[off : off + HEADER_BYTES] != meta.encode():
                raise CorruptBlock(f"slot {slot} header does not match block {key.hex()}")
            meta.verify(payload)
        except CorruptBlock:
            self._drop(key)
            return None
        return Block(meta, payload)

    async def contains(self, key: bytes) -> bool:
        return key in self._slots

    async def delete(self, key: bytes) -> bool:
        if key not in self._slots:
            return False
        self._drop(key)
        return True

    def _drop(self, key: bytes) -> None:
        slot = self._slots.pop(key)
        del self._metas[slot]
        off = self._slot_offset(slot)
        self._map[off : off + HEADER_BYTES] = _NO_HEADER
        self._release(slot, 0.0)

    async def scan(self) -> AsyncIterator[BlockMeta]:
        for meta in list(self._metas.values()):
            yield meta

    async def close(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Unmap and remove the arena this tier owns (idempotent)."""
        if self._closed:
            return
        self._closed = True
        del self._bytes
        self._view.release()
        self._owned.release()

    def check_integrity(self) -> None:
        used = set(self._metas)
        free = set(self._free)
        cooling = {slot for _, slot in self._cooling}
        assert len(free) == len(self._free), "a slot is on the free list twice"
        assert len(cooling) == len(self._cooling), "a slot is cooling twice"
        assert not (free & used) and not (free & self._reserved) and not (used & self._reserved)
        assert not (cooling & (free | used | self._reserved)), "a cooling slot is also in use"
        total = len(free) + len(used) + len(self._reserved) + len(cooling)
        assert total == self.num_slots, "slots leaked"
        assert set(self._tainted) <= used, "a tainted slot is not in use"
        deadlines = [t for t, _ in self._cooling]
        assert deadlines == sorted(deadlines), "cooling slots out of order"
        assert len(self._slots) == len(self._metas), "key map and slot map disagree"
        for key, slot in self._slots.items():
            meta = self._metas[slot]
            assert meta.key == key, f"slot {slot} holds {meta.key.hex()}, map says {key.hex()}"
            off = self._slot_offset(slot)
            assert BlockMeta.decode(self._map[off : off + HEADER_BYTES]) == meta, "header drift"
