"""Write-down: every block published in the host arena is copied to each lower tier in the
background, so a commit answers at memory speed and the block becomes safe on disk (and
shared through Redis) soon after.

The queue is bounded: a slow tier applies back-pressure to publishers instead of growing
memory. Payloads are snapshotted before the lower-tier writes (holding host pins across disk
or network I/O would block eviction, and a slot may be reused once its block leaves host). A
lower tier's residency is added to the index only once that tier says the block is stored.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from tiers.base import Block

if TYPE_CHECKING:
    from tiers.stack import TierStack

log = logging.getLogger("cacheservice.stack")
BATCH = 64


class WriteDown:
    def __init__(self, stack: TierStack, queue_size: int = 4096) -> None:
        self.stack = stack
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="cacheservice-writedown")

    async def enqueue(self, key: bytes) -> None:
        await self._queue.put(key)

    async def drain(self) -> None:
        """Wait until every queued block has been written down (or failed to)."""
        if self._task is not None:
            await self._queue.join()

    async def close(self) -> None:
        if self._task is None:
            return
        await self.drain()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def _loop(self) -> None:
        while True:
            keys = [await self._queue.get()]
            while len(keys) < BATCH and not self._queue.empty():
                keys.append(self._queue.get_nowait())
            try:
                await self._write(keys)
            except Exception:  # a tier bug must not kill write-down for good
                log.exception("write-down of %d blocks failed", len(keys))
            finally:
                for _ in keys:
                    self._queue.task_done()

    async def _write(self, keys: list[bytes]) -> None:
        stack, tree = self.stack, self.stack.tree
        live = [k for k in keys if (n := tree.get(k)) is not None and stack.host.name in n.tiers]
        blocks = []
        for key in live:
            block = await stack.host.get(key)
            if block is None:
                await stack.failed_read(key, stack.host)
            else:
                blocks.append(Block(block.meta, bytes(block.payload)))
        for index in range(1, len(stack.tiers)):
            name = stack.tiers[index].name
            todo = [
                b for b in blocks if (n := tree.get(b.meta.key)) is not None and name not in n.tiers
            ]
            if not todo:
                continue
            done = await stack.put_into(index, [(b.meta, b.payload) for b in todo])
            for block, ok in zip(todo, done, strict=True):
                if ok:
                    stack.add_tier(block.meta.key, name)
                    stack.counters.written_down += 1
