"""Blocks other hosts wrote to a shared tier (Redis), found for a lookup this host's index
cannot answer.

A shared tier's keys belong to every host: the local tree knows only what this host stored or
read. A lookup that runs past the local hits asks the shared tiers about the rest, but within
a short budget: one slow or dead remote never slows a lookup past it (the question finishes
in the background, indexing what it finds for the next lookup, one question at a time).
Whatever a shared tier answers is untrusted: an edge the tree refuses (a cycle, a block that
is its own parent) ends the run and is counted, never indexed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from index.hashing import ROOT_KEY
from index.radix import PrefixTree
from tiers.base import Block, Tier


class SharedLookup:
    def __init__(self, tiers: Sequence[Tier], tree: PrefixTree, counters) -> None:
        self.tiers = [t for t in tiers if getattr(t, "shared", False)]
        self.tree = tree
        self.counters = counters  # the stack's: remote_timeouts counts budget overruns
        self.budget_s = 0.05
        self._pending: asyncio.Task | None = None

    async def discover(self, keys: Sequence[bytes], start: int) -> int:
        """``extend`` within ``budget_s``. Past the budget the question goes on in the
        background and this returns ``start``; while one such question is pending, no other
        is asked."""
        if start >= len(keys) or not self.tiers:
            return start
        if self._pending is not None and not self._pending.done():
            return start
        task = asyncio.ensure_future(self.extend(list(keys), start))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.budget_s)
        except TimeoutError:
            self.counters.remote_timeouts += 1
            self._pending = task
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            return start

    async def extend(self, keys: Sequence[bytes], start: int, parent: bytes = ROOT_KEY) -> int:
        """Ask the shared tiers about ``keys[start:]``; index the consecutive ones found.
        Returns the new hit count."""
        for tier in self.tiers:
            if start >= len(keys):
                break
            found = await tier.contains_many(keys[start:])
            prev = keys[start - 1] if start else parent
            for key, ok in zip(keys[start:], found, strict=True):
                if not ok or not self.tree.insert(prev, key, tier.name, 0):
                    break
                prev = key
                start += 1
        return start

    async def fetch(self, key: bytes) -> Block | None:
        """A block no local index knows, from a shared tier, indexed once it has been read."""
        for tier in self.tiers:
            block = await tier.get(key)
            if block is not None and self.tree.get(key) is None:
                if not self.tree.insert(block.meta.parent, key, tier.name, block.meta.length):
                    tier.errors.skipped += 1
                    return None
                return block
        return None

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.gather(self._pending, return_exceptions=True)
