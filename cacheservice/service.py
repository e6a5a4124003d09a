"""CacheService: the domain object behind every HTTP handler (PROTOCOL.md semantics).

It validates input (a bad request raises a typed error before any state changes), owns the
namespaces, the leases and the chunk index, and drives the TierStack. Leases: an acquire
lease pins blocks (readers copy them out of the arena zero copy); a reserve lease holds
allocated, unpublished host slots that the writer fills. A periodic task releases or aborts
leases not settled within their ``lease_ms``, so a crashed engine leaks nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import msgpack
import xxhash

from cacheservice.errors import (
    BadRequest,
    NamespaceConflict,
    TooLarge,
    UnknownNamespace,
    WrongBlockSize,
)
from index.chunks import ChunkEntry, ChunkIndex, decode_entry, encode_entry
from index.hashing import KEY_BYTES, ROOT_KEY, Namespace
from index.radix import Node, PrefixTree
from tiers.base import FLAG_MANIFEST, BlockMeta, Tier, checksum
from tiers.host import HostTier
from tiers.stack import TierStack

log = logging.getLogger("cacheservice.service")
_NS_DOMAIN = b"cacheservice/namespace\x00"
OFFLOOP_CHECKSUM_BYTES = 4 << 20  # checksum bigger batches in a worker thread


@dataclass(frozen=True)
class NamespaceInfo:
    ns: str
    seed: int
    block_bytes: int
    arena: dict


@dataclass(frozen=True)
class LookupResult:
    hits: int
    tiers: list[str]


@dataclass(frozen=True)
class AcquireResult:
    lease: str
    slots: list[int]
    checksums: list[int]
    lengths: list[int]


@dataclass(frozen=True)
class ReserveResult:
    lease: str
    slots: list[int | None]


@dataclass(frozen=True)
class GetBlocksResult:
    count: int
    data: bytes
    present: list[bool]


@dataclass
class _Lease:
    id: str
    deadline: float
    pins: list[Node] = field(default_factory=list)  # acquire: pinned nodes
    metas: list[BlockMeta | None] = field(default_factory=list)  # reserve: block to publish
    slots: list[int | None] = field(default_factory=list)  # reserve: slot per block


def namespace_manifest_key(seed: int) -> bytes:
    return xxhash.xxh3_128_digest(_NS_DOMAIN + seed.to_bytes(8, "little"))


class CacheService:
    def __init__(
        self, host: HostTier, lower: list[Tier], *, lease_ms: int = 30000, max_keys: int = 65536
    ) -> None:
        self.host = host
        self.tree = PrefixTree()
        self.stack = TierStack(host, lower, self.tree)
        self.chunks = ChunkIndex()
        self.lease_ms = lease_ms
        self.max_keys = max_keys
        self._namespaces: dict[str, tuple[Namespace, int]] = {}
        self._leases: dict[str, _Lease] = {}
        self._reserving: dict[bytes, str] = {}  # key -> write lease holding a slot for it
        self._tasks: set[asyncio.Task] = set()
        self._expiry: asyncio.Task | None = None
        self.counters = {"hits": 0, "misses": 0, "stores": 0}

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.stack.start()
        for block in await self.stack.rebuild():
            self._load_manifest(block.meta, block.payload)
        period = max(0.05, min(1.0, self.lease_ms / 4000))
        self._expiry = asyncio.create_task(self._expire_loop(period), name="cacheservice-leases")

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
            self._expiry = None
        for lease_id in list(self._leases):
            self.release(lease_id)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stack.close()

    async def drain(self) -> None:
        """Wait for background writes (manifests, write-down) to finish."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stack.drain()

    def _load_manifest(self, meta: BlockMeta, payload: bytes | memoryview) -> None:
        try:
            doc = msgpack.unpackb(payload, raw=False)
            kind = doc.get("kind") if isinstance(doc, dict) else None
        except (ValueError, msgpack.UnpackException):
            kind = None
        if kind == "namespace":
            try:
                ns = Namespace.from_dict(doc["namespace"])
                self.register_namespace(ns, doc["block_bytes"], persist=False)
            except (TypeError, ValueError, KeyError, TooLarge, NamespaceConflict) as e:
                log.warning("namespace manifest %s not restored: %s", meta.key.hex(), e)
        elif (entry := decode_entry(payload)) is not None:
            self.chunks.add(meta.ns, meta.key, entry)
        else:
            log.warning("unreadable manifest %s ignored", meta.key.hex())

    # -- validation -------------------------------------------------------------------------

    def _ns(self, ns: str) -> tuple[Namespace, int]:
        got = self._namespaces.get(ns)
        if got is None:
            raise UnknownNamespace(
                f"namespace {ns!r} is not registered: POST /v1/namespace "
                "(CacheClient.register) with its Namespace and block_bytes first"
            )
        return got

    def _keys(self, keys: Sequence[bytes] | bytes | memoryview, what: str = "keys") -> list[bytes]:
        if isinstance(keys, bytes | bytearray | memoryview):
            blob = bytes(keys)
            if len(blob) % KEY_BYTES:
                raise BadRequest(
                    f"{what} is {len(blob)} bytes, not a multiple of {KEY_BYTES}: send the "
                    "16-byte keys of index.hashing concatenated"
                )
            keys = [blob[i : i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]
        else:
            keys = list(keys)
            if not all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in keys):
                raise BadRequest(f"every entry of {what} must be a {KEY_BYTES}-byte block key")
        if len(keys) > self.max_keys:
            raise TooLarge(
                f"{len(keys)} {what} exceed max_keys={self.max_keys}: split the request or "
                "raise the service's --max-keys"
            )
        return keys

    @staticmethod
    def _key(key: bytes, what: str) -> bytes:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise BadRequest(f"{what} must be a {KEY_BYTES}-byte key (ROOT_KEY = 16 zero bytes)")
        return key

    def _new_lease_id(self) -> str:
        return secrets.token_hex(8)

    def _deadline(self, lease_ms: int | None) -> float:
        ms = self.lease_ms if lease_ms is None else lease_ms
        if ms <= 0:
            raise BadRequest(f"lease_ms must be positive, got {ms}")
        return time.monotonic() + ms / 1000

    # -- namespaces -------------------------------------------------------------------------

    def register_namespace(
        self, ns: Namespace, block_bytes: int, *, persist: bool = True
    ) -> NamespaceInfo:
        if not isinstance(block_bytes, int) or block_bytes <= 0:
            raise BadRequest(f"block_bytes must be a positive integer, got {block_bytes!r}")
        if block_bytes > self.host.max_payload:
            need = -(-(block_bytes + 64) // 4096) * 4096
            raise TooLarge(
                f"block_bytes={block_bytes} exceeds the arena slot payload "
                f"{self.host.max_payload}: restart the service with --slot-bytes {need} or more"
            )
        known = self._namespaces.get(ns.id)
        if known is not None and known[1] != block_bytes:
            raise NamespaceConflict(
                f"namespace {ns.id} is registered with block_bytes={known[1]}, not "
                f"{block_bytes}: change a Namespace field (e.g. salt) for a new KV layout"
            )
        if known is None:
            self._namespaces[ns.id] = (ns, block_bytes)
            if persist:
                self._persist_namespace(ns, block_bytes)
        return NamespaceInfo(ns.id, ns.seed, block_bytes, self.host.arena_info())

    def _persist_namespace(self, ns: Namespace, block_bytes: int) -> None:
        if not self.stack.lower:
            return
        doc = {"kind": "namespace", "namespace": ns.to_dict(), "block_bytes": block_bytes}
        payload = msgpack.packb(doc, use_bin_type=True)
        key = namespace_manifest_key(ns.seed)
        meta = BlockMeta.for_payload(ns.seed, key, ROOT_KEY, payload, FLAG_MANIFEST)
        self._spawn(self.stack.put_manifest(meta, payload))

    def _spawn(self, coro) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (start() restoring happens inside one): nothing to do
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- prefix reuse -----------------------------------------------------------------------

    async def _match(self, keys: list[bytes]) -> LookupResult:
        m = self.tree.match(keys)
        if m.length < len(keys) and await self.stack.remote_extend(keys, m.length) > m.length:
            m = self.tree.match(keys)
        return LookupResult(m.length, m.tiers)

    async def lookup(self, ns: str, keys: list[bytes]) -> LookupResult:
        self._ns(ns)
        keys = self._keys(keys)
        result = await self._match(keys)
        self.counters["hits"] += result.hits
        self.counters["misses"] += len(keys) - result.hits
        return result

    async def acquire(
        self, ns: str, keys: list[bytes], lease_ms: int | None = None
    ) -> AcquireResult:
        self._ns(ns)
        keys = self._keys(keys)
        deadline = self._deadline(lease_ms)
        hits = (await self._match(keys)).hits
        # Pin the whole hit first so promoting block i cannot evict block j < i.
        pins = self.tree.pin(keys[:hits])
        slots: list[int] = []
        checksums: list[int] = []
        lengths: list[int] = []
        for key in keys[:hits]:
            slot = self.host.slot_of(key)
            if slot is None and await self.stack.fetch(key) is not None:
                slot = self.host.slot_of(key)
            meta = self.host.meta_of(key)
            if slot is None or meta is None:
                break  # a lower-tier read failed or host is full of pinned blocks: a miss
            slots.append(slot)
            checksums.append(meta.checksum)
            lengths.append(meta.length)
        assert len(pins) == hits, "a matched block left the index before it was pinned"
        self.tree.unpin_nodes(pins[len(slots) :])
        lease = _Lease(self._new_lease_id(), deadline, pins=pins[: len(slots)])
        self._leases[lease.id] = lease
        return AcquireResult(lease.id, slots, checksums, lengths)

    def release(self, lease: str) -> int:
        """Unpin an acquire lease, or abort a reserve lease (its slots are freed). An unknown
        or already expired lease releases nothing."""
        held = self._leases.pop(lease, None)
        if held is None:
            return 0
        self.tree.unpin_nodes(held.pins)
        freed = 0
        for meta, slot in zip(held.metas, held.slots, strict=True):
            if slot is not None:
                self.host.free(slot)
                self._reserving.pop(meta.key, None)
                freed += 1
        return len(held.pins) + freed

    async def reserve(self, ns: str, keys: list[bytes], parent: bytes = ROOT_KEY) -> ReserveResult:
        namespace, block_bytes = self._ns(ns)
        keys = self._keys(keys)
        parent = self._key(parent, "parent")
        lease = _Lease(self._new_lease_id(), self._deadline(None))
        seen: set[bytes] = set()
        new = []
        for i, key in enumerate(keys):
            if key not in seen and key not in self._reserving and self.tree.get(key) is None:
                new.append(i)
            seen.add(key)
        await self.stack.host_slots(len(new))
        lease.slots = [None] * len(keys)
        lease.metas = [None] * len(keys)
        for i in new:
            slot = self.host.alloc()
            if slot is None:
                break
            lease.slots[i] = slot
            prev = keys[i - 1] if i else parent
            lease.metas[i] = BlockMeta(namespace.seed, keys[i], prev, block_bytes, 0)
            self._reserving[keys[i]] = lease.id
        self._leases[lease.id] = lease
        return ReserveResult(lease.id, list(lease.slots))

    async def commit(self, lease: str, ok: list[bool] | None = None) -> int:
        held = self._leases.get(lease)
        if held is None or held.pins:
            return 0  # expired (already aborted) or not a reserve lease: nothing stored
        if ok is not None and len(ok) != len(held.slots):
            raise BadRequest(
                f"ok has {len(ok)} entries but the lease reserved {len(held.slots)} blocks: "
                "send one bool per reserved key, or omit ok to commit all"
            )
        del self._leases[lease]
        todo: list[tuple[BlockMeta, int]] = []
        for i, (meta, slot) in enumerate(zip(held.metas, held.slots, strict=True)):
            if slot is None:
                continue
            self._reserving.pop(meta.key, None)
            if ok is None or ok[i]:
                todo.append((meta, slot))
            else:
                self.host.free(slot)
        views = [self.host.payload_view(slot, meta.length) for meta, slot in todo]
        sums = await self._checksums(views)
        for (meta, slot), csum in zip(todo, sums, strict=True):
            meta = replace(meta, checksum=csum)
            self.host.publish(slot, meta)
            await self.stack.published(meta)
        self.counters["stores"] += len(todo)
        return len(todo)

    async def _checksums(self, views: list[memoryview]) -> list[int]:
        if sum(len(v) for v in views) >= OFFLOOP_CHECKSUM_BYTES:
            return await asyncio.to_thread(lambda: [checksum(v) for v in views])
        return [checksum(v) for v in views]

    async def exists(self, ns: str, keys: list[bytes]) -> int:
        """Consecutive keys present from the start, in any tier (flat key-value use)."""
        self._ns(ns)
        keys = self._keys(keys)
        count = 0
        for key in keys:
            if self.tree.get(key) is None:
                break
            count += 1
        for tier in self.stack.lower:
            if getattr(tier, "shared", False) and count < len(keys):
                for found in await tier.contains_many(keys[count:]):
                    if not found:
                        break
                    count += 1
        self.counters["hits"] += count
        self.counters["misses"] += len(keys) - count
        return count

    # -- remote data path -------------------------------------------------------------------

    async def put_blocks(
        self,
        ns: str,
        keys: list[bytes],
        parent: bytes,
        data: bytes | memoryview,
        flat: bool = False,
    ) -> int:
        """Store blocks from a request body; returns how many of ``keys`` are stored now."""
        namespace, block_bytes = self._ns(ns)
        keys = self._keys(keys)
        parent = self._key(parent, "parent")
        view = memoryview(data).cast("B")
        if len(view) != len(keys) * block_bytes:
            raise WrongBlockSize(
                f"data is {len(view)} bytes but {len(keys)} blocks of this namespace's "
                f"block_bytes={block_bytes} need {len(keys) * block_bytes}: send exactly "
                "n * block_bytes bytes (block_bytes was fixed at register)"
            )
        payloads = [view[i * block_bytes : (i + 1) * block_bytes] for i in range(len(keys))]
        sums = await self._checksums(payloads)
        stored = 0
        for i, key in enumerate(keys):
            prev = ROOT_KEY if flat else (keys[i - 1] if i else parent)
            meta = BlockMeta(namespace.seed, key, prev, block_bytes, sums[i])
            new = self.tree.get(key) is None
            if await self.stack.store(meta, payloads[i]):
                stored += 1
                self.counters["stores"] += new
        return stored

    async def get_blocks(self, ns: str, keys: list[bytes], prefix: bool = True) -> GetBlocksResult:
        _, block_bytes = self._ns(ns)
        keys = self._keys(keys)
        out: list[bytes] = []
        present: list[bool] = []
        for key in keys:
            block = await self.stack.fetch(key)
            # copied before the next await: a host payload is only valid while nothing evicts
            ok = block is not None and len(block.payload) == block_bytes
            if ok:
                out.append(bytes(block.payload))
            present.append(ok)
            if prefix and not ok:
                break
        present += [False] * (len(keys) - len(present))
        return GetBlocksResult(len(out), b"".join(out), present)

    # -- chunks -----------------------------------------------------------------------------

    async def register_chunk(
        self,
        ns: str,
        chunk: bytes,
        num_tokens: int,
        start_pos: int,
        keys: list[bytes],
        data: bytes | None = None,
    ) -> bool:
        """Record a chunk whose blocks are stored (or stored now from ``data``, chained from the
        chunk key). False when some block is not stored."""
        namespace, _ = self._ns(ns)
        chunk = self._key(chunk, "chunk")
        keys = self._keys(keys)
        if not isinstance(num_tokens, int) or num_tokens <= 0:
            raise BadRequest(f"num_tokens must be a positive integer, got {num_tokens!r}")
        if not isinstance(start_pos, int) or start_pos < 0:
            raise BadRequest(f"start_pos must be a non-negative integer, got {start_pos!r}")
        expected = -(-num_tokens // namespace.block_tokens)
        if len(keys) != expected:
            raise BadRequest(
                f"a {num_tokens}-token chunk has {expected} blocks of {namespace.block_tokens} "
                f"tokens, got {len(keys)} keys: use index.hashing.chunk_block_keys"
            )
        if data is not None:
            await self.put_blocks(ns, keys, chunk, data)
        if not all(self.tree.get(k) is not None for k in keys):
            return False
        entry = ChunkEntry(num_tokens, start_pos, keys)
        self.chunks.add(namespace.seed, chunk, entry)
        manifest = encode_entry(namespace.seed, chunk, entry)
        await self.stack.put_manifest(manifest.meta, manifest.payload)
        return True

    def lookup_chunks(self, ns: str, chunks: list[bytes]) -> list[ChunkEntry | None]:
        namespace, _ = self._ns(ns)
        out: list[ChunkEntry | None] = []
        for chunk in self._keys(chunks, "chunks"):
            entry = self.chunks.get(chunk, namespace.seed)
            if entry is not None:
                entry = replace(entry, resident=all(self.tree.present(entry.keys)))
            out.append(entry)
        return out

    # -- leases, introspection --------------------------------------------------------------

    def expire_leases(self, now: float | None = None) -> int:
        """Release (acquire) or abort (reserve) every lease past its deadline."""
        now = time.monotonic() if now is None else now
        expired = [lid for lid, lease in self._leases.items() if lease.deadline <= now]
        for lid in expired:
            self.release(lid)
        return len(expired)

    async def _expire_loop(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                if n := self.expire_leases():
                    log.info("expired %d leases", n)

    def stats(self) -> dict:
        tiers = self.stack.tiers
        c = self.stack.counters
        return {
            "namespaces": len(self._namespaces),
            "blocks": {t.name: self.tree.blocks_in(t.name) for t in tiers},
            "bytes": {t.name: t.used_bytes for t in tiers},
            "capacity": {t.name: t.capacity_bytes for t in tiers},
            **self.counters,
            "evictions": c.evictions,
            "corrupt": c.corrupt,
            "leases": len(self._leases),
            "chunks": len(self.chunks),
            "promotions": c.promotions,
            "written_down": c.written_down,
        }

    def check_integrity(self) -> None:
        """Call after ``drain``: stack, tree and chunk invariants plus lease bookkeeping."""
        self.stack.check_integrity()
        self.chunks.check_integrity()
        reserved: dict[bytes, str] = {}
        for lid, lease in self._leases.items():
            assert all(n.pins > 0 for n in lease.pins), f"lease {lid} holds an unpinned node"
            assert not (lease.pins and lease.slots), f"lease {lid} both reads and writes"
            for meta, slot in zip(lease.metas, lease.slots, strict=True):
                if slot is not None:
                    assert self.host.slot_of(meta.key) != slot, f"slot {slot} reserved+published"
                    reserved[meta.key] = lid
        assert reserved == self._reserving, "reserving map drifted from the leases"
