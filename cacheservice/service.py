"""CacheService: the domain object behind every HTTP handler (PROTOCOL.md semantics).

It validates input (a bad request raises a typed error before any state changes), owns the
namespaces (``namespaces.py``), the leases (``leases.py``) and the chunk index, and drives the
TierStack. Callers import every result type from here, also those defined in those modules.

Key lists pass the trust boundary (validate.py) before anything changes. Reads check each
stored header's namespace against the request's, so knowing another namespace's raw keys
reads nothing. A response never exceeds ``max_body_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace

from cacheservice import validate
from cacheservice.errors import BadRequest, WrongBlockSize
from cacheservice.leases import LeaseTable
from cacheservice.manifests import decode_entry, encode_entry
from cacheservice.namespaces import NamespaceRegistry
from cacheservice.results import (  # noqa: F401  (re-exported: callers import results here)
    AcquireResult,
    GetBlocksResult,
    LookupResult,
    NamespaceInfo,
    ReserveResult,
)
from index.chunks import ChunkEntry, ChunkIndex
from index.hashing import ROOT_KEY, Namespace
from index.radix import PrefixTree
from tiers.base import BlockMeta, Tier, TierErrors
from tiers.host import HostTier
from tiers.slots import checksums
from tiers.stack import TierStack

log = logging.getLogger("cacheservice.service")


class CacheService:
    def __init__(
        self,
        host: HostTier,
        lower: list[Tier],
        *,
        lease_ms: int = 30000,
        max_keys: int = 65536,
        max_response_bytes: int = 64 << 20,
        remote_lookup_ms: int = 50,
    ) -> None:
        self.host = host
        self.tree = PrefixTree()
        self.stack = TierStack(host, lower, self.tree)
        self.stack.on_dropped = self._block_dropped
        self.stack.remote.budget_s = remote_lookup_ms / 1000
        self.chunks = ChunkIndex()
        self.namespaces = NamespaceRegistry(host, self.stack)
        self.leases = LeaseTable(self.stack.slots, lease_ms)
        self.max_keys = max_keys
        self.max_response_bytes = max_response_bytes
        self.counters = {"hits": 0, "misses": 0, "stores": 0}
        self._tasks: set[asyncio.Task] = set()

    @property
    def lease_ms(self) -> int:
        return self.leases.lease_ms

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.stack.start()
        for block in await self.stack.rebuild():
            self._load_manifest(block.meta, block.payload)
        self.leases.start()

    async def close(self) -> None:
        await self.leases.close()
        await self.drain()
        await self.stack.close()

    async def drain(self) -> None:
        """Wait for background writes (manifests, write-down) to finish."""
        await self.namespaces.drain()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stack.drain()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _load_manifest(self, meta: BlockMeta, payload: bytes | memoryview) -> None:
        """Restore a namespace or a chunk from its manifest. A chunk whose blocks did not
        survive, and a manifest nobody can read, would hold disk bytes forever: removed."""
        if self.namespaces.restore(meta, payload):
            return
        entry = decode_entry(payload)
        if entry is not None and all(self.tree.get(k) is not None for k in entry.keys):
            self.chunks.add(meta.ns, meta.key, entry)
            return
        why = "its blocks are gone" if entry is not None else "unreadable or of unknown kind"
        log.info("manifest %s removed: %s", meta.key.hex(), why)
        self.stack.counters.dropped += 1
        self._spawn(self.stack.delete_manifest(meta.key))

    def _block_dropped(self, key: bytes) -> None:
        """A block stopped being stored: every chunk made of it goes, with its manifest."""
        for chunk in self.chunks.drop_block(key):
            self._spawn(self.stack.delete_manifest(chunk))

    # -- validation -------------------------------------------------------------------------

    def _keys(
        self,
        keys: Sequence[bytes] | bytes | memoryview,
        what: str = "keys",
        parent: bytes | None = None,
    ) -> list[bytes]:
        return validate.key_list(keys, self.max_keys, what, parent)

    def _response_fits(self, n: int, block_bytes: int) -> None:
        validate.response_fits(n, block_bytes, self.max_response_bytes)

    _key = staticmethod(validate.one_key)

    def register_namespace(
        self, ns: Namespace, block_bytes: int, *, persist: bool = True
    ) -> NamespaceInfo:
        """Register in memory; its manifest is written in the background (see
        ``register_namespace_durable`` for the answer the HTTP API gives)."""
        return self.namespaces.register(ns, block_bytes, persist=persist)

    async def register_namespace_durable(self, ns: Namespace, block_bytes: int) -> NamespaceInfo:
        """Register and return only once the manifest is on the durable tiers (fsynced on
        disk), so a namespace the service answered for survives a crash right after."""
        info = self.namespaces.register(ns, block_bytes, persist=True)
        await self.namespaces.persisted(ns.id)  # also when another request registered it first
        return info

    # -- prefix reuse -----------------------------------------------------------------------

    async def _match(self, keys: list[bytes]) -> LookupResult:
        m = self.tree.match(keys)
        if m.length < len(keys) and await self.stack.remote.discover(keys, m.length) > m.length:
            m = self.tree.match(keys)
        return LookupResult(m.length, m.tiers)

    async def lookup(self, ns: str, keys: list[bytes], tiers: bool = True) -> LookupResult:
        """The stored prefix of ``keys``; ``tiers`` False: its length only, found by binary
        search over the chained keys (no pass over them), tiers left empty."""
        probe = validate.key_blob(keys, self.max_keys) if not tiers else self._keys(keys)
        self.namespaces.get(ns)  # after the keys: a malformed body is a 400 first
        hits = self.tree.match_length(probe) if not tiers else -1
        if not tiers and (hits == len(probe) or not self.stack.remote.tiers):
            result = LookupResult(hits, [])
        else:  # every key checked, then matched edge by edge (and asked of a shared tier)
            full = await self._match(probe if tiers else self._keys(keys))
            result = full if tiers else LookupResult(full.hits, [])
        self.counters["hits"] += result.hits
        self.counters["misses"] += len(probe) - result.hits
        return result

    async def _present(self, keys: list[bytes]) -> int:
        """Consecutive keys present from the start in any tier, wherever they sit in the tree.
        Keys found only in a shared tier get indexed, so that an acquire can pin them."""
        count = self._run(keys)
        if count < len(keys) and await self.stack.remote.discover(keys, count) > count:
            count = self._run(keys)  # counted again: the await may have evicted some
        return count

    def _run(self, keys: list[bytes]) -> int:
        return next((i for i, key in enumerate(keys) if key not in self.tree), len(keys))

    async def acquire(
        self, ns: str, keys: list[bytes], lease_ms: int | None = None, flat: bool = False
    ) -> AcquireResult:
        """Lease the longest hit prefix (``flat``: the longest run of present keys, which need
        not start at the root) readable from the arena."""
        keys = self._keys(keys)
        namespace, _ = self.namespaces.get(ns)
        deadline = self.leases.deadline(lease_ms)
        hits = await self._present(keys) if flat else (await self._match(keys)).hits
        # No await between the count above and the pin inside leases.acquire.
        return await self.leases.acquire(namespace.seed, keys[:hits], deadline)

    def release(self, lease: str) -> int:
        """Unpin an acquire lease, or abort a reserve lease (its slots are freed). An unknown
        or already expired lease releases nothing."""
        return self.leases.release(lease)

    async def reserve(
        self, ns: str, keys: list[bytes], parent: bytes = ROOT_KEY, chunk: bool = False
    ) -> ReserveResult:
        """``chunk``: ``parent`` is a chunk's key (the root of its block chain, as
        ``register_chunk`` chains them), so the chain may evict like one from the root."""
        parent = self._key(parent, "parent")
        if chunk and parent == ROOT_KEY:
            raise BadRequest("chunk: true needs parent = the chunk's key (index.hashing.chunk_key)")
        keys = self._keys(keys, parent=parent)
        namespace, block_bytes = self.namespaces.get(ns)
        return await self.leases.reserve(namespace, block_bytes, keys, parent, chunk)

    async def commit(
        self,
        lease: str,
        ok: list[bool] | None = None,
        sums: list[int | None] | None = None,
        spots: list[int | None] | None = None,
    ) -> int:
        stored = await self.leases.commit(lease, ok, sums, spots)
        self.counters["stores"] += stored
        return stored

    async def exists(self, ns: str, keys: list[bytes]) -> int:
        """Consecutive keys present from the start, in any tier (flat key-value use)."""
        keys = self._keys(keys)
        self.namespaces.get(ns)
        count = await self._present(keys)
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
        chunk: bool = False,
    ) -> int:
        """Store blocks from a request body; returns how many of ``keys`` are stored now.
        ``chunk``: ``parent`` is a chunk's key (the root of its chain), not a block."""
        parent = self._key(parent, "parent")
        keys = self._keys(keys, parent=None if flat else parent)
        namespace, block_bytes = self.namespaces.get(ns)
        view = memoryview(data).cast("B")
        if len(view) != len(keys) * block_bytes:
            raise WrongBlockSize(
                f"data is {len(view)} bytes but {len(keys)} blocks of this namespace's "
                f"block_bytes={block_bytes} need {len(keys) * block_bytes}: send exactly "
                "n * block_bytes bytes (block_bytes was fixed at register)"
            )
        payloads = [view[i * block_bytes : (i + 1) * block_bytes] for i in range(len(keys))]
        sums = await checksums(payloads)
        stored = 0
        # Blocks after a missing one are reachable by no prefix lookup: they may take free
        # slots but never evict (else a full arena trades a prompt's head for its tail).
        anchored = flat or chunk or parent == ROOT_KEY or parent in self.tree
        for i, key in enumerate(keys):
            prev = ROOT_KEY if flat else (keys[i - 1] if i else parent)
            meta = BlockMeta(namespace.seed, key, prev, block_bytes, sums[i])
            new = self.tree.get(key) is None
            ok = await self.stack.store(meta, payloads[i], evict=anchored)
            stored += ok
            self.counters["stores"] += ok and new
            anchored = flat or ok
        return stored

    async def get_blocks(self, ns: str, keys: list[bytes], prefix: bool = True) -> GetBlocksResult:
        keys = self._keys(keys)
        namespace, block_bytes = self.namespaces.get(ns)
        self._response_fits(len(keys), block_bytes)
        out: list[bytes] = []
        present: list[bool] = []
        for key in keys:
            block = await self.stack.fetch(key)
            # copied before the next await: a host payload is only valid while nothing evicts
            ok = block is not None and len(block.payload) == block_bytes
            ok = ok and block.meta.ns == namespace.seed
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
        chunk = self._key(chunk, "chunk")
        if chunk == ROOT_KEY:
            raise BadRequest(
                "chunk must be the chunk's key (index.hashing.chunk_key), not ROOT_KEY"
            )
        keys = self._keys(keys, parent=chunk)
        if not isinstance(num_tokens, int) or num_tokens <= 0:
            raise BadRequest(f"num_tokens must be a positive integer, got {num_tokens!r}")
        if not isinstance(start_pos, int) or start_pos < 0:
            raise BadRequest(f"start_pos must be a non-negative integer, got {start_pos!r}")
        namespace, _ = self.namespaces.get(ns)
        expected = -(-num_tokens // namespace.block_tokens)
        if len(keys) != expected:
            raise BadRequest(
                f"a {num_tokens}-token chunk has {expected} blocks of {namespace.block_tokens} "
                f"tokens, got {len(keys)} keys: use index.hashing.chunk_block_keys"
            )
        if data is not None:
            await self.put_blocks(ns, keys, chunk, data, chunk=True)
        if not all(self.tree.get(k) is not None for k in keys):
            return False
        entry = ChunkEntry(num_tokens, start_pos, keys)
        manifest = encode_entry(namespace.seed, chunk, entry)
        if self.stack.lower and not await self.stack.put_manifest(manifest.meta, manifest.payload):
            return False  # it would not survive a restart: say so rather than promise
        if not all(self.tree.get(k) is not None for k in keys):
            await self.stack.delete_manifest(chunk)  # a block left while the manifest was written
            return False
        self.chunks.add(namespace.seed, chunk, entry)
        return True

    def lookup_chunks(self, ns: str, chunks: list[bytes]) -> list[ChunkEntry | None]:
        chunks = self._keys(chunks, "chunks")
        namespace, _ = self.namespaces.get(ns)
        out: list[ChunkEntry | None] = []
        for chunk in chunks:
            entry = self.chunks.get(chunk, namespace.seed)
            if entry is not None:
                entry = replace(entry, resident=all(self.tree.present(entry.keys)))
            out.append(entry)
        return out

    # -- leases, introspection --------------------------------------------------------------

    def expire_leases(self, now: float | None = None) -> int:
        """Release (acquire) or abort (reserve) every lease past its deadline."""
        return self.leases.expire(now)

    def stats(self) -> dict:
        tiers = self.stack.tiers
        c = self.stack.counters
        errors = {t.name: vars(t.errors) for t in tiers}
        totals = {kind: sum(e[kind] for e in errors.values()) for kind in vars(TierErrors())}
        return {
            "namespaces": len(self.namespaces),
            "blocks": {t.name: self.tree.blocks_in(t.name) for t in tiers},
            "bytes": {t.name: t.used_bytes for t in tiers},
            "capacity": {t.name: t.capacity_bytes for t in tiers},
            **self.counters,
            "evictions": c.evictions,
            "dropped": c.dropped,
            **totals,  # corrupt, io_error, no_space, scan_removed, skipped: over all tiers
            "refused": c.refused,
            "fenced": self.leases.fenced,
            "failed_reads": c.failed_reads,
            "remote_timeouts": c.remote_timeouts,
            "errors": errors,
            "leases": len(self.leases),
            "reserved_slots": self.leases.reserved_slots,
            "cooling_slots": self.host.cooling_slots,
            "chunks": len(self.chunks),
            "promotions": c.promotions,
            "written_down": c.written_down,
        }

    def check_integrity(self) -> None:
        """Call after ``drain``: stack, tree and chunk invariants plus lease bookkeeping."""
        self.stack.check_integrity()
        self.chunks.check_integrity()
        self.leases.check_integrity()
        gone = [c for c, e in self.chunks.items() if not all(self.tree.present(e.keys))]
        assert not gone, f"{len(gone)} chunks name blocks that are no longer stored"
