"""Redis tier: blocks shared across hosts through one Redis server (or a proxy in front of a
cluster). Value = 64-byte header + payload written with ONE ``SET``, so another host reads
the whole block or nothing; the header lets any host rebuild its index through ``scan``.

Redis is remote and may be slow or gone: every failure or timeout is a miss (``get``) or a
refusal (``put`` returns False), never an exception into the service. After a connection
failure the tier answers "miss" without touching the network for ``retry_after`` seconds, so a
dead server costs one timeout, not one per block.

Capacity is accounted locally over the blocks this tier has written, scanned or read; other
hosts writing the same Redis are not counted (Redis' own maxmemory policy bounds the server).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis._parsers.resp2 import _AsyncRESP2Parser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tiers.base import HEADER_BYTES, Block, BlockMeta, CorruptBlock, Tier, decode_block

T = TypeVar("T")
_SCAN_BATCH = 512
_BIG_VALUE = 64 << 10
# Bytes per pipelined round trip. Pipelining many multi-MiB values makes both sides buffer
# them whole (fresh memory, page faults) and is slower than a few round trips.
_ROUND_TRIP_BYTES = 4 << 20
_STREAM_LIMIT = 2 << 20
_FAILURES = (RedisError, OSError)
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class _StreamingParser(_AsyncRESP2Parser):
    """RESP2 parser that reads a large bulk string straight into one buffer, in socket-sized
    pieces, instead of redis-py's readexactly + concatenate + slice (three extra full-size
    copies). Returns a memoryview over that buffer; small replies keep the stock path."""

    def on_connect(self, connection) -> None:
        super().on_connect(connection)
        # asyncio's default 64 KiB stream limit pauses the socket whenever 128 KiB wait unread,
        # i.e. after every 256 KiB recv of a large value: a pause/resume (two epoll_ctl calls
        # and a stalled sender) per piece. Let a round trip's worth stay buffered instead.
        self._stream._limit = max(self._stream._limit, _STREAM_LIMIT)

    async def _read(self, length: int) -> bytes | memoryview:
        want = length + 2  # the value and its CRLF
        have = max(0, len(self._buffer) - self._pos)
        if length < _BIG_VALUE or have >= want:
            return await super()._read(length)
        view = memoryview(np.empty(want, dtype=np.uint8))
        view[:have] = memoryview(self._buffer)[self._pos :]
        got = have
        try:
            while got < want:
                piece = await self._stream.read(want - got)
                if not piece:
                    raise RedisConnectionError("Redis closed the connection mid-value")
                view[got : got + len(piece)] = piece
                got += len(piece)
        except BaseException:
            # keep what was consumed so redis-py can re-parse this reply (as its parser does)
            self._chunks.append(bytes(view[have:got]))
            raise
        self._chunks.append(view[have:])
        self._pos += want
        return view[:length]


def _round_trips(sizes: Sequence[int]) -> list[range]:
    """Split item indexes into consecutive groups of at most _ROUND_TRIP_BYTES (>= 1 item)."""
    groups: list[range] = []
    start = total = 0
    for i, size in enumerate(sizes):
        if i > start and total + size > _ROUND_TRIP_BYTES:
            groups.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        groups.append(range(start, len(sizes)))
    return groups


class RedisTier(Tier):
    name = "redis"
    shared = True  # other hosts write the same keys: a miss here may be a hit there

    def __init__(
        self,
        url: str,
        capacity_bytes: int,
        prefix: str = "cs:",
        *,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
        retry_after: float = 1.0,
    ) -> None:
        self.url = url
        self.prefix = prefix.encode()
        self.retry_after = retry_after
        self._capacity = capacity_bytes
        self._sizes: dict[bytes, int] = {}
        self._used = 0
        self._down_until = 0.0
        # Generous read timeout: a 32 MiB value must not time out on a slow link; one retry
        # without backoff reconnects a pooled connection that the server dropped.
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 1),
            protocol=2,
            parser_class=_StreamingParser,
        )

    def _rkey(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def _track(self, key: bytes, size: int) -> None:
        self._used += size - self._sizes.get(key, 0)
        self._sizes[key] = size

    def _forget(self, key: bytes) -> None:
        self._used -= self._sizes.pop(key, 0)

    async def _call(self, op: Callable[[], Awaitable[T]], default: T) -> T:
        """Run one Redis round trip; any failure is ``default`` (a miss), never an exception."""
        if time.monotonic() < self._down_until:
            return default
        try:
            return await op()
        except _FAILURES as e:
            if isinstance(e, _UNREACHABLE):
                self._down_until = time.monotonic() + self.retry_after
            return default

    # -- writes -----------------------------------------------------------------------------

    async def put(self, meta: BlockMeta, payload: bytes | memoryview) -> bool:
        return (await self.put_many([(meta, payload)]))[0]

    async def put_many(self, items: Sequence[tuple[BlockMeta, bytes | memoryview]]) -> list[bool]:
        sizes = [HEADER_BYTES + meta.length for meta, _ in items]
        fits: list[bool] = []
        room = self._capacity - self._used
        for (meta, payload), size in zip(items, sizes, strict=True):
            assert meta.length == len(payload), "meta.length must equal the payload length"
            ok = meta.key in self._sizes or size <= room
            room -= 0 if meta.key in self._sizes else size * ok
            fits.append(ok)
        todo = [(meta, payload) for (meta, payload), ok in zip(items, fits, strict=True) if ok]
        if not todo:
            return fits

        async def send() -> bool:
            for group in _round_trips([HEADER_BYTES + meta.length for meta, _ in todo]):
                async with self._client.pipeline(transaction=False) as pipe:
                    for meta, payload in (todo[i] for i in group):
                        # join copies once; redis-py sends a large value as its own chunk
                        pipe.set(self._rkey(meta.key), b"".join((meta.encode(), payload)))
                    if not all(await pipe.execute()):
                        return False
            return True

        if not await self._call(send, False):
            return [False] * len(items)
        for meta, _ in todo:
            self._track(meta.key, HEADER_BYTES + meta.length)
        return fits

    async def delete(self, key: bytes) -> bool:
        known = key in self._sizes
        self._forget(key)
        removed = await self._call(lambda: self._client.delete(self._rkey(key)), 0)
        return bool(removed) or known

    # -- reads ------------------------------------------------------------------------------

    async def get(self, key: bytes) -> Block | None:
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[bytes]) -> list[Block | None]:
        if not keys:
            return []

        async def fetch() -> list:
            values: list = []
            for group in _round_trips([self._sizes.get(k, 0) for k in keys]):
                values += await self._client.mget([self._rkey(keys[i]) for i in group])
            return values

        values = await self._call(fetch, None)
        if values is None:  # unreachable: a miss, but the blocks are not known to be gone
            return [None] * len(keys)
        blocks: list[Block | None] = []
        for key, value in zip(keys, values, strict=True):
            block = None
            if value is not None:
                try:
                    block = decode_block(value)
                    if block.meta.key != key:
                        raise CorruptBlock(f"value under {key.hex()} names another block")
                    self._track(key, len(value))
                except CorruptBlock:
                    block = None
                    await self.delete(key)
            else:
                self._forget(key)
            blocks.append(block)
        return blocks

    async def contains(self, key: bytes) -> bool:
        return (await self.contains_many([key]))[0]

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        async def ask() -> list[bool]:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(self._rkey(key))
                return [bool(n) for n in await pipe.execute()]

        return await self._call(ask, [False] * len(keys)) if keys else []

    async def scan(self) -> AsyncIterator[BlockMeta]:
        batch: list[bytes] = []
        cursor: int | None = None
        while cursor != 0:
            cursor, found = await self._call(
                lambda c=cursor or 0: self._client.scan(
                    c, match=self.prefix + b"*", count=_SCAN_BATCH
                ),
                (0, []),
            )
            batch.extend(found)
            if len(batch) >= _SCAN_BATCH or (cursor == 0 and batch):
                async for meta in self._headers(batch):
                    yield meta
                batch = []

    async def _headers(self, rkeys: list[bytes]) -> AsyncIterator[BlockMeta]:
        async def fetch() -> list:
            async with self._client.pipeline(transaction=False) as pipe:
                for rk in rkeys:
                    pipe.getrange(rk, 0, HEADER_BYTES - 1)
                    pipe.strlen(rk)
                return await pipe.execute()

        replies = await self._call(fetch, [])
        for i in range(0, len(replies), 2):
            rk, head, size = rkeys[i // 2], replies[i], replies[i + 1]
            try:
                key = bytes.fromhex(rk[len(self.prefix) :].decode())
                meta = BlockMeta.decode(head)
            except (ValueError, UnicodeDecodeError, CorruptBlock):
                continue  # not one of ours (or torn beyond repair): leave foreign keys alone
            if meta.key != key or size != HEADER_BYTES + meta.length:
                await self.delete(key)
                continue
            self._track(key, size)
            yield meta

    async def close(self) -> None:
        await self._client.aclose()

    def check_integrity(self) -> None:
        assert self._used == sum(self._sizes.values()), "used_bytes drifted from the key map"
        assert all(s >= HEADER_BYTES for s in self._sizes.values()), "a tracked value is short"
