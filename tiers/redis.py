"""Redis tier: blocks shared across hosts through one Redis server (or a proxy in front of a
cluster). Value = 64-byte header + payload written with ONE ``SET``, so another host reads
the whole block or nothing; the header lets any host rebuild its index through ``scan``.
Values travel through ``tiers.resp`` (no user-space copy of a payload, the checksum computed as
each value arrives); the small commands go through redis-py.

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

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tiers.base import (
    HEADER_BYTES,
    Block,
    BlockMeta,
    CorruptBlock,
    Tier,
    TierStartError,
    decode_block,
)
from tiers.resp import RespConnection, RespError

T = TypeVar("T")
_SCAN_BATCH = 512
# Bytes per pipelined round trip. Pipelining many multi-MiB values makes both sides buffer
# them whole (fresh memory, page faults) and is slower than a few round trips.
_ROUND_TRIP_BYTES = 4 << 20
_MAX_IDLE = 8  # idle bulk connections kept; a burst beyond that closes its extras
_FAILURES = (RedisError, OSError, RespError)
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


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


def _decoded(value: memoryview | None) -> Block | CorruptBlock | None:
    """Parse and verify a value as it arrives, while the server sends the next one."""
    if value is None:
        return None
    try:
        return decode_block(value)
    except CorruptBlock as e:
        return e


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
        super().__init__()
        self.url = url
        self.prefix = prefix.encode()
        self.retry_after = retry_after
        self._capacity = capacity_bytes
        self._sizes: dict[bytes, int] = {}
        self._used = 0
        self._down_until = 0.0
        # Generous read timeout: a 32 MiB value must not time out on a slow link; one retry
        # without backoff reconnects a pooled connection that the server dropped.
        self._timeouts = (timeout, connect_timeout)
        self._client = self._make_client(url, timeout, connect_timeout)
        # Values move through RespConnections, one per concurrent SET/MGET round trip, kept
        # idle between calls; the small commands (EXISTS, DEL, SCAN, GETRANGE) keep redis-py.
        self._idle: dict[str, list[RespConnection]] = {}  # by server URL
        self._closed = False

    async def start(self) -> None:
        """Refuse to start when the server refuses our credentials (wrong password, an ACL
        user without rights); a server that is merely down is a miss until it is back."""
        try:
            await self._probe()
        except (AuthenticationError, AuthorizationError) as e:
            raise TierStartError(f"Redis at {self.url} refused us: {e}") from None
        except ResponseError as e:
            if "NOAUTH" in str(e) or "WRONGPASS" in str(e) or "NOPERM" in str(e):
                raise TierStartError(f"Redis at {self.url} refused us: {e}") from None
            raise
        except (RedisError, OSError):
            self._down_until = time.monotonic() + self.retry_after

    async def _probe(self) -> None:
        await self._client.ping()

    def _make_client(self, url: str, timeout: float, connect_timeout: float):
        return aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 1),
            protocol=2,
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
            self.errors.io_error += 1
            if isinstance(e, _UNREACHABLE):
                self._down_until = time.monotonic() + self.retry_after
            return default

    async def _on_connection(
        self, op: Callable[[RespConnection], Awaitable[T]], url: str | None = None
    ) -> T:
        """Run ``op`` on an idle connection to ``url`` (default: the tier's) or a new one. A
        connection that failed or was cancelled mid-command is closed; a reused one the server
        dropped gets one retry on a new one (SET and GET are idempotent)."""
        url = url or self.url
        idle = self._idle.setdefault(url, [])
        for fresh in (not idle, True):
            conn = await RespConnection.open(url, *self._timeouts) if fresh else None
            conn = conn or idle.pop()
            try:
                result = await op(conn)
            except BaseException as e:
                conn.close()
                if fresh or not isinstance(e, ConnectionError):
                    raise
                continue
            if self._closed or len(idle) >= _MAX_IDLE:
                conn.close()
            else:
                idle.append(conn)
            return result
        raise AssertionError("unreachable: the fresh attempt returns or raises")

    async def _bulk(self, op: Callable[[RespConnection], Awaitable[T]], default: T) -> T:
        return await self._call(lambda: self._on_connection(op), default)

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

        values = [(self._rkey(meta.key), (meta.encode(), payload)) for meta, payload in todo]
        if not await self._send(values, [HEADER_BYTES + meta.length for meta, _ in todo]):
            return [False] * len(items)
        for meta, _ in todo:
            self._track(meta.key, HEADER_BYTES + meta.length)
        return fits

    async def _send(self, values: list[tuple[bytes, tuple[bytes, bytes | memoryview]]],
                    sizes: list[int]) -> bool:  # fmt: skip
        """SET every (key, (header, payload)); False when the server failed or is away."""

        async def send(conn: RespConnection) -> bool:
            for group in _round_trips(sizes):
                await conn.set_many([values[i] for i in group])
            return True

        return await self._bulk(send, False)

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

        rkeys = [self._rkey(k) for k in keys]
        values = await self._fetch(rkeys, [self._sizes.get(k, 0) for k in keys])
        if values is None:  # unreachable: a miss, but the blocks are not known to be gone
            return [None] * len(keys)
        blocks: list[Block | None] = []
        for key, block in zip(keys, values, strict=True):
            if block is None:
                self._forget(key)
            elif isinstance(block, CorruptBlock) or block.meta.key != key:
                block = None  # corrupt, or a value under this key that names another block
                self.errors.corrupt += 1
                await self.delete(key)
            else:
                self._track(key, HEADER_BYTES + block.meta.length)
            blocks.append(block)
        return blocks

    async def _fetch(
        self, rkeys: list[bytes], sizes: list[int]
    ) -> list[Block | CorruptBlock | None] | None:
        """Every value, verified as it arrives; None when the server failed or is away."""

        async def fetch(conn: RespConnection) -> list[Block | CorruptBlock | None]:
            values: list[Block | CorruptBlock | None] = []
            for group in _round_trips(sizes):
                values += await conn.mget([rkeys[i] for i in group], _decoded)
            return values

        return await self._bulk(fetch, None)

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
                self.errors.scan_removed += 1
                await self.delete(key)
                continue
            self._track(key, size)
            yield meta

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        await self._client.aclose()

    def check_integrity(self) -> None:
        assert self._used == sum(self._sizes.values()), "used_bytes drifted from the key map"
        assert all(s >= HEADER_BYTES for s in self._sizes.values()), "a tracked value is short"
