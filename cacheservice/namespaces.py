"""Registered namespaces and their manifests.

A namespace fixes ``block_bytes`` for its KV layout; registering it again with another size is
a conflict, never a silent resize. Each registration is written as a manifest block to the
lower tiers (in the background) so a restarted service knows its namespaces before any engine
registers again.
"""

from __future__ import annotations

import asyncio
import logging

import msgpack
import xxhash

from cacheservice.errors import (
    BadRequest,
    NamespaceConflict,
    Overloaded,
    TooLarge,
    UnknownNamespace,
)
from cacheservice.results import NamespaceInfo
from index.hashing import ROOT_KEY, Namespace
from tiers.base import FLAG_MANIFEST, BlockMeta
from tiers.host import HostTier
from tiers.stack import TierStack

log = logging.getLogger("cacheservice.service")  # the name operators already filter on
_NS_DOMAIN = b"cacheservice/namespace\x00"


def namespace_manifest_key(seed: int) -> bytes:
    return xxhash.xxh3_128_digest(_NS_DOMAIN + seed.to_bytes(8, "little"))


class NamespaceRegistry:
    """Namespace id -> (Namespace, block_bytes); owns the tasks persisting new manifests."""

    def __init__(self, host: HostTier, stack: TierStack, max_namespaces: int = 1024) -> None:
        self.host = host
        self.stack = stack
        # Each namespace is index memory and an fsynced manifest: a client must not be able
        # to register millions. Real deployments have a handful (models x layouts x ranks).
        self.max_namespaces = max_namespaces
        self._known: dict[str, tuple[Namespace, int]] = {}
        self._writing: dict[str, asyncio.Task] = {}  # ns id -> its manifest write in flight

    def __len__(self) -> int:
        return len(self._known)

    def get(self, ns: str) -> tuple[Namespace, int]:
        got = self._known.get(ns)
        if got is None:
            raise UnknownNamespace(
                f"namespace {ns!r} is not registered: POST /v1/namespace "
                "(CacheClient.register) with its Namespace and block_bytes first"
            )
        return got

    def known(self) -> list[tuple[Namespace, int]]:
        return list(self._known.values())

    def register(self, ns: Namespace, block_bytes: int, *, persist: bool = True) -> NamespaceInfo:
        if not isinstance(block_bytes, int) or block_bytes <= 0:
            raise BadRequest(f"block_bytes must be a positive integer, got {block_bytes!r}")
        if block_bytes > self.host.max_payload:
            need = -(-(block_bytes + 64) // 4096) * 4096
            raise TooLarge(
                f"block_bytes={block_bytes} exceeds the arena slot payload "
                f"{self.host.max_payload}: restart the service with --slot-bytes {need} or more"
            )
        known = self._known.get(ns.id)
        if known is not None and known[1] != block_bytes:
            raise NamespaceConflict(
                f"namespace {ns.id} is registered with block_bytes={known[1]}, not "
                f"{block_bytes}: change a Namespace field (e.g. salt) for a new KV layout"
            )
        if known is None and len(self._known) >= self.max_namespaces:
            raise Overloaded(
                f"{len(self._known)} namespaces are registered (max {self.max_namespaces}): "
                "reuse a namespace per model and KV layout, or restart with a higher limit"
            )
        if known is None:
            self._known[ns.id] = (ns, block_bytes)
            if persist:
                self._persist(ns, block_bytes)
        return NamespaceInfo(ns.id, ns.seed, block_bytes, self.host.arena_info())

    def restore(self, meta: BlockMeta, payload: bytes | memoryview) -> bool:
        """Register the namespace a manifest block describes. False when the block is not a
        namespace manifest (it may be a chunk manifest); a bad one is logged and skipped."""
        try:
            doc = msgpack.unpackb(payload, raw=False)
            kind = doc.get("kind") if isinstance(doc, dict) else None
        except (ValueError, msgpack.UnpackException):
            kind = None
        if kind != "namespace":
            return False
        try:
            ns = Namespace.from_dict(doc["namespace"])
            self.register(ns, doc["block_bytes"], persist=False)
        except (TypeError, ValueError, KeyError, TooLarge, NamespaceConflict, Overloaded) as e:
            log.warning("namespace manifest %s not restored: %s", meta.key.hex(), e)
        return True

    async def drain(self) -> None:
        await asyncio.gather(*self._writing.values(), return_exceptions=True)

    async def persisted(self, ns_id: str) -> None:
        """Wait until the manifest of ``ns_id`` (if one is being written) is stored."""
        task = self._writing.get(ns_id)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def _persist(self, ns: Namespace, block_bytes: int) -> None:
        if not self.stack.lower:
            return
        doc = {"kind": "namespace", "namespace": ns.to_dict(), "block_bytes": block_bytes}
        payload = msgpack.packb(doc, use_bin_type=True)
        key = namespace_manifest_key(ns.seed)
        meta = BlockMeta.for_payload(ns.seed, key, ROOT_KEY, payload, FLAG_MANIFEST)
        coro = self.stack.put_manifest(meta, payload)
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (start() restoring happens inside one): nothing to do
            coro.close()
            return
        self._writing[ns.id] = task
        task.add_done_callback(lambda t, ns_id=ns.id: self._writing.pop(ns_id, None))
