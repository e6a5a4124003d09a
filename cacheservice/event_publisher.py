"""The service's own tiers as vLLM KV events: a PUB socket and a ROUTER replay socket.

Routers that already consume vLLM's events (``BlockStored`` / ``BlockRemoved`` over ZMQ with
``(topic, seq, payload)`` frames and a replay buffer) can follow cacheservice as one more
medium without code of ours: every block a tier starts or stops holding becomes an event
whose ``block_hashes`` are our keys (index/hashing.py: any client with the namespace seed
computes them from tokens), ``medium`` is ``CPU`` for the host arena and ``STORAGE`` below,
``ownership`` names the tier and ``locality`` says ``LOCAL`` or ``REMOTE`` (the shared tier).
The service keeps KV by key, not tokens, so ``token_ids`` is empty and ``block_size`` 0.

Changes are collected while the event loop runs and sent as one batch per loop turn (at most
``max_batch`` events), so a burst of stores costs one message, never a blocked loop: the PUB
send never waits (a subscriber past the high-water mark loses batches and replays them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import zmq
import zmq.asyncio

from cacheservice.kv_events import (
    END_SEQ,
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    Event,
    Removed,
    Stored,
    encode_batch,
    seq_bytes,
)

log = logging.getLogger("cacheservice.events")
_MEDIUM = {"host": MEDIUM_CPU}
_REMOTE = {"redis"}


class TierEventPublisher:
    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        *,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        max_batch: int = 4096,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.max_batch = max_batch
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.seq = 0
        self.dropped = 0  # batches the PUB socket refused (no room): replay still has them
        self._pending: list[Event] = []
        self._flush_scheduled = False
        self._ctx = zmq.asyncio.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._pub.bind(self.endpoint)
        if self.replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.setsockopt(zmq.MAXMSGSIZE, 4096)
            self._replay.bind(self.replay_endpoint)
            self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def close(self) -> None:
        self._flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._pub.close(linger=0)

    def on_tier(self, key: bytes, parent: bytes | None, tier: str, held: bool) -> None:
        """PrefixTree.on_tier: queue the change; sent at the end of this loop turn."""
        medium = _MEDIUM.get(tier, MEDIUM_STORAGE)
        locality = "REMOTE" if tier in _REMOTE else "LOCAL"
        if held:
            event: Event = Stored([key], parent, [], 0, medium, ownership=tier, locality=locality)
        else:
            event = Removed([key], medium, ownership=tier, locality=locality)
        self._pending.append(event)
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:  # no loop (start-up rebuild): the next change sends it
                self._flush_scheduled = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        events, self._pending = self._pending, []
        payload = encode_batch(time.time(), events)
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self.topic, seq_bytes(seq), payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    async def _serve_replay(self) -> None:
        assert self._replay is not None, "replay socket is bound in start()"
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                continue  # not a replay request: nothing to answer
            client, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in list(self.buffer):
                if seq >= start:
                    await self._replay.send_multipart(
                        (client, b"", self.topic, seq_bytes(seq), payload)
                    )
            await self._replay.send_multipart((client, b"", b"", END_SEQ, b""))
