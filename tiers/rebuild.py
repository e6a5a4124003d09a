"""The index after a restart: every block the tiers still hold goes back into the tree.

Stored headers are untrusted (a disk can hold anything, a shared tier holds what every host
wrote): a header whose edge the tree refuses (a cycle, a block that is its own parent) is
skipped, counted in its tier's ``errors.skipped``, and removed from a local tier; a shared
tier's keys belong to every host and are left alone. Manifests (FLAG_MANIFEST) are never
indexed: they are returned for the service to replay.
"""

from __future__ import annotations

from collections.abc import Sequence

from index.radix import PrefixTree
from tiers.base import FLAG_MANIFEST, Block, Tier


async def rebuild_index(
    tiers: Sequence[Tier], tree: PrefixTree, shared: Sequence[Tier]
) -> list[Block]:
    """Index what ``tiers`` hold, fastest first; returns the manifest blocks (one per key)."""
    manifests: dict[bytes, Block] = {}
    for tier in tiers:
        found: list[bytes] = []
        refused: list[bytes] = []
        async for meta in tier.scan():
            if meta.flags & FLAG_MANIFEST:
                found.append(meta.key)
            elif not tree.insert(meta.parent, meta.key, tier.name, meta.length):
                tier.errors.skipped += 1
                refused.append(meta.key)
        if tier not in shared:
            for key in refused:
                await tier.delete(key)
        todo = [k for k in found if k not in manifests]
        for block in await tier.get_many(todo) if todo else []:
            if block is not None:
                manifests[block.meta.key] = block
    return list(manifests.values())
