"""One engine's KV-event stream, kept in step with its cache (vLLM's ZMQ publisher).

A SUB socket receives ``(topic, seq, batch)``; a fresh DEALER asks the publisher's ROUTER for
missed batches. The stream is trusted only while it is provably complete:

- seq ``last + 1`` is applied; a seq at or below ``last`` is a duplicate (replay overlap); a
  jump asks for a replay from ``last + 1``. A replay that starts later than asked (the
  engine's buffer dropped batches), times out or cannot be asked (no replay endpoint) clears
  what the engine holds and follows the stream from there: fewer hits, never a stale one.
- A replay from ``last + 1`` also runs every ``catchup_s`` while the stream is quiet, so a
  batch lost before the subscription reached the publisher (or past its high-water mark)
  is found within that bound even if no later batch shows the gap.
- ZMTP heartbeats (``heartbeat_s``) turn a dead, hung or unreachable engine into a
  disconnect; a disconnect clears the engine's blocks at once (a restarted engine's cache is
  empty), and a reconnect replays from seq 0 to rebuild what the buffer still holds.
- A batch that does not decode clears the engine (its effect is unknown) and is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from cacheservice.kv_events import (
    END_SEQ,
    MEDIUM_GPU,
    Batch,
    Cleared,
    EventFormatError,
    Removed,
    decode_batch,
    parse_seq,
    seq_bytes,
)
from cacheservice.results import EngineSpec
from index.engines import EngineBlocks

log = logging.getLogger("cacheservice.engines")
MAX_MESSAGE_BYTES = 64 << 20


@dataclass
class FeedStats:
    batches: int = 0
    duplicates: int = 0
    gaps: int = 0
    replays: int = 0
    resyncs: int = 0  # times the engine's blocks were cleared because the stream broke
    disconnects: int = 0
    bad_batches: int = 0
    skipped_events: int = 0  # not this namespace's GPU blocks (LoRA, salted, other medium)
    last_event: float = 0.0  # monotonic time of the last applied batch


class EngineFeed:
    def __init__(
        self,
        spec: EngineSpec,
        blocks: EngineBlocks,
        *,
        heartbeat_s: float = 0.5,
        catchup_s: float = 1.0,
        replay_timeout_s: float = 1.0,
    ) -> None:
        self.spec = spec
        self.blocks = blocks
        self.heartbeat_s = heartbeat_s
        self.catchup_s = catchup_s
        self.replay_timeout_s = replay_timeout_s
        self.stats = FeedStats()
        self.connected = False
        self.last_seq: int | None = None
        self._ctx = zmq.asyncio.Context.instance()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.blocks.clear()
        self.connected = False

    # -- the loop ---------------------------------------------------------------------------

    def _socket(self) -> zmq.asyncio.Socket:
        sub = self._ctx.socket(zmq.SUB)
        ivl = max(1, int(self.heartbeat_s * 1000))
        sub.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 4 * ivl)
        sub.setsockopt(zmq.HEARTBEAT_TTL, 4 * ivl)
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.spec.topic.encode())
        return sub

    async def _run(self) -> None:
        sub = self._socket()
        monitor = sub.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        )
        sub.connect(self.spec.endpoint)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                ready = dict(await poller.poll(int(self.catchup_s * 1000)))
                if monitor in ready:
                    await self._on_monitor(parse_monitor_message(await monitor.recv_multipart()))
                if sub in ready:
                    await self._on_message(await sub.recv_multipart())
                elif not ready and self.connected:
                    await self._catch_up()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not take the service down: forget the engine
            log.exception(
                "engine %s: event feed failed; its blocks are forgotten", self.spec.engine
            )
            self.blocks.clear()
            self.connected = False
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    async def _on_monitor(self, event: dict) -> None:
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected = True
            await self._replay(0 if self.last_seq is None else self.last_seq + 1)
        else:  # disconnected or closed: whatever the engine held may be gone
            if self.connected:
                self.stats.disconnects += 1
                log.info("engine %s disconnected: its blocks are forgotten", self.spec.engine)
            self.connected = False
            self._reset()

    async def _on_message(self, frames: list[bytes]) -> None:
        if not self.connected:
            # Sent before a disconnect we already acted on: the reconnect's replay decides.
            self.stats.duplicates += 1
            return
        if len(frames) != 3:
            self._bad(f"a message has {len(frames)} frames, not 3")
            return
        try:
            seq = parse_seq(frames[1])
        except EventFormatError as e:
            self._bad(str(e))
            return
        if self.last_seq is not None and seq <= self.last_seq:
            self.stats.duplicates += 1
            return
        if self.last_seq is not None and seq > self.last_seq + 1:
            self.stats.gaps += 1
            await self._replay(self.last_seq + 1)
            if self.last_seq is not None and seq <= self.last_seq:
                return  # the replay brought this batch too
        self._apply(seq, frames[2])

    async def _catch_up(self) -> None:
        if self.spec.replay_endpoint is not None:
            await self._replay(0 if self.last_seq is None else self.last_seq + 1)

    # -- replay -----------------------------------------------------------------------------

    async def _replay(self, start: int) -> None:
        """Apply the publisher's buffered batches from ``start``; the engine's blocks are
        cleared when they cannot prove the stream complete."""
        if self.spec.replay_endpoint is None:
            if start > 0:
                self._resync("no replay endpoint to fill a gap")
            return
        self.stats.replays += 1
        dealer = self._ctx.socket(zmq.DEALER)  # fresh: a late answer to an old ask is never read
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        try:
            dealer.connect(self.spec.replay_endpoint)
            await dealer.send_multipart([b"", seq_bytes(start)])
            deadline = time.monotonic() + self.replay_timeout_s
            first = True
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not await dealer.poll(int(left * 1000) + 1):
                    self._resync("replay timed out")
                    return
                frames = await dealer.recv_multipart()
                if len(frames) != 4 or frames[2] == END_SEQ:
                    return
                try:
                    seq = parse_seq(frames[2])
                except EventFormatError as e:
                    self._resync(f"replay: {e}")
                    return
                if first and start > 0 and seq > start and self.last_seq is not None:
                    self._resync(f"replay starts at {seq}, not {start}: batches were dropped")
                first = False
                if self.last_seq is None or seq > self.last_seq:
                    self._apply(seq, frames[3])
        finally:
            dealer.close(linger=0)

    # -- state ------------------------------------------------------------------------------

    def _reset(self) -> None:
        self.blocks.clear()
        self.last_seq = None

    def _resync(self, why: str) -> None:
        self.stats.resyncs += 1
        log.info("engine %s: %s; its blocks are forgotten", self.spec.engine, why)
        self.blocks.clear()

    def _bad(self, why: str) -> None:
        self.stats.bad_batches += 1
        self._resync(f"bad event message ({why})")

    def _apply(self, seq: int, payload: bytes) -> None:
        self.last_seq = seq
        try:
            batch = decode_batch(payload)
        except EventFormatError as e:
            self._bad(str(e))
            return
        apply_batch(self.blocks, batch, self.stats)


def apply_batch(blocks: EngineBlocks, batch: Batch, stats: FeedStats) -> None:
    """Apply one decoded batch to an engine's blocks: only its own (GPU) cache of the base
    model, unsalted, in the first KV cache group, is ours to route to."""
    stats.batches += 1
    stats.last_event = time.monotonic()
    for event in batch.events:
        if isinstance(event, Cleared):
            blocks.clear()
        elif event.group != 0 or event.medium not in (None, MEDIUM_GPU):
            stats.skipped_events += 1
        elif isinstance(event, Removed):
            blocks.removed(event.hashes)
        elif event.lora or event.extra:
            stats.skipped_events += 1
        else:
            blocks.stored(event.parent, event.hashes, event.token_ids, event.block_size)
