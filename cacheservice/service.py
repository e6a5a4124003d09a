"""CacheService: the domain object behind every HTTP handler (PROTOCOL.md semantics).

It validates input (a bad request raises a typed error before any state changes), owns the
namespaces (``namespaces.py``), the leases (``leases.py``) and the chunk index, and drives the
TierStack. Callers import every result type from here, also those defined in those modules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cacheservice.errors import BadRequest, TooLarge, WrongBlockSize
from cacheservice.leases import AcquireResult, LeaseTable, ReserveResult, checksums
from cacheservice.namespaces import NamespaceInfo, NamespaceRegistry
from index.chunks import ChunkEntry, ChunkIndex, decode_entry, encode_entry
from index.hashing import KEY_BYTES, ROOT_KEY, Namespace
from index.radix import PrefixTree
from tiers.base import BlockMeta, Tier
from tiers.host import HostTier
from tiers.stack import TierStack

log = logging.getLogger("cacheservice.service")


@dataclass(frozen=True)
class LookupResult:
    hits: int
    tiers: list[str]


@dataclass(frozen=True)
class GetBlocksResult:
    count: int
    data: bytes
    present: list[bool]


class CacheService:
    def __init__(
        self, host: HostTier, lower: list[Tier], *, lease_ms: int = 30000, max_keys: int = 65536
    ) -> None:
        self.host = host
        self.tree = PrefixTree()
        self.stack = TierStack(host, lower, self.tree)
        self.chunks = ChunkIndex()
        self.namespaces = NamespaceRegistry(host, self.stack)
        self.leases = LeaseTable(host, self.tree, self.stack, lease_ms)
        self.max_keys = max_keys
        self.counters = {"hits": 0, "misses": 0, "stores": 0}

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
        await self.namespaces.drain()
        await self.stack.close()

    async def drain(self) -> None:
        """Wait for background writes (manifests, write-down) to finish."""
        await self.namespaces.drain()
        await self.stack.drain()

    def _load_manifest(self, meta: BlockMeta, payload: bytes | memoryview) -> None:
        if self.namespaces.restore(meta, payload):
            return
        if (entry := decode_entry(payload)) is not None:
            self.chunks.add(meta.ns, meta.key, entry)
        else:
            log.warning("unreadable manifest %s ignored", meta.key.hex())

    # -- validation -------------------------------------------------------------------------

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

    def register_namespace(
        self, ns: Namespace, block_bytes: int, *, persist: bool = True
    ) -> NamespaceInfo:
        return self.namespaces.register(ns, block_bytes, persist=persist)

    # -- prefix reuse -----------------------------------------------------------------------

    async def _match(self, keys: list[bytes]) -> LookupResult:
        m = self.tree.match(keys)
        if m.length < len(keys) and await self.stack.remote_extend(keys, m.length) > m.length:
            m = self.tree.match(keys)
        return LookupResult(m.length, m.tiers)

    async def lookup(self, ns: str, keys: list[bytes]) -> LookupResult:
        self.namespaces.get(ns)
        keys = self._keys(keys)
        result = await self._match(keys)
        self.counters["hits"] += result.hits
        self.counters["misses"] += len(keys) - result.hits
        return result

    async def _present(self, keys: list[bytes]) -> int:
        """Consecutive keys present from the start in any tier, wherever they sit in the tree.
        Keys found only in a shared tier get indexed, so that an acquire can pin them."""
        count = self._run(keys)
        if count < len(keys) and await self.stack.remote_extend(keys, count) > count:
            count = self._run(keys)  # counted again: the await may have evicted some
        return count

    def _run(self, keys: list[bytes]) -> int:
        return next((i for i, key in enumerate(keys) if key not in self.tree), len(keys))

    async def acquire(
        self, ns: str, keys: list[bytes], lease_ms: int | None = None, flat: bool = False
    ) -> AcquireResult:
        """Lease the longest hit prefix (``flat``: the longest run of present keys, which need
        not start at the root) readable from the arena."""
        self.namespaces.get(ns)
        keys = self._keys(keys)
        deadline = self.leases.deadline(lease_ms)
        hits = await self._present(keys) if flat else (await self._match(keys)).hits
        # No await between the count above and the pin inside leases.acquire.
        return await self.leases.acquire(keys[:hits], deadline)

    def release(self, lease: str) -> int:
        """Unpin an acquire lease, or abort a reserve lease (its slots are freed). An unknown
        or already expired lease releases nothing."""
        return self.leases.release(lease)

    async def reserve(self, ns: str, keys: list[bytes], parent: bytes = ROOT_KEY) -> ReserveResult:
        namespace, block_bytes = self.namespaces.get(ns)
        keys = self._keys(keys)
        parent = self._key(parent, "parent")
        return await self.leases.reserve(namespace, block_bytes, keys, parent)

    async def commit(self, lease: str, ok: list[bool] | None = None) -> int:
        stored = await self.leases.commit(lease, ok)
        self.counters["stores"] += stored
        return stored

    async def exists(self, ns: str, keys: list[bytes]) -> int:
        """Consecutive keys present from the start, in any tier (flat key-value use)."""
        self.namespaces.get(ns)
        keys = self._keys(keys)
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
    ) -> int:
        """Store blocks from a request body; returns how many of ``keys`` are stored now."""
        namespace, block_bytes = self.namespaces.get(ns)
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
        sums = await checksums(payloads)
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
        _, block_bytes = self.namespaces.get(ns)
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
        namespace, _ = self.namespaces.get(ns)
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
        namespace, _ = self.namespaces.get(ns)
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
        return self.leases.expire(now)

    def stats(self) -> dict:
        tiers = self.stack.tiers
        c = self.stack.counters
        return {
            "namespaces": len(self.namespaces),
            "blocks": {t.name: self.tree.blocks_in(t.name) for t in tiers},
            "bytes": {t.name: t.used_bytes for t in tiers},
            "capacity": {t.name: t.capacity_bytes for t in tiers},
            **self.counters,
            "evictions": c.evictions,
            "corrupt": c.corrupt,
            "leases": len(self.leases),
            "chunks": len(self.chunks),
            "promotions": c.promotions,
            "written_down": c.written_down,
        }

    def check_integrity(self) -> None:
        """Call after ``drain``: stack, tree and chunk invariants plus lease bookkeeping."""
        self.stack.check_integrity()
        self.chunks.check_integrity()
        self.leases.check_integrity()
