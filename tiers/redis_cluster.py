"""Redis tier on a native Redis Cluster: every block key routed to the master that owns its
slot, MOVED/ASK and failover handled by redis-py's cluster client (topology refreshed on
errors), TLS (``rediss://``) and ACL users from the URL.

Same value format, accounting and failure contract as the single-server tier (redis.py):
one SET per block (a block is visible whole or not at all), checksum verified on every read,
every failure a miss or a refused put, a dead node skipped for ``retry_after``.

Values take the zero-copy RESP path (tiers/resp.py) made slot-aware: each key is routed to the
master that owns its slot in redis-py's slot map, the batch is split per node and the nodes
are written or read concurrently, each over pipelined SETs / GETs (an MGET across slots is a
CROSSSLOT error). redis-py's cluster pipeline, which copies each value twice on the way out and
again on the way in (half the throughput at 32 MiB: benchmarks/bench_redis_cluster.py), is the
fallback: for TLS, which a raw non-blocking socket with ``sendmsg`` cannot speak, and for a
batch that met MOVED/ASK (a resharding), after the slot map is refreshed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar
from urllib.parse import parse_qs, urlparse

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError

from tiers.base import Block, BlockMeta, CorruptBlock
from tiers.redis import RedisTier, _decoded, _round_trips
from tiers.resp import RespConnection, RespError

_SCAN_BATCH = 512
T = TypeVar("T")


class _Rerouted(Exception):
    """A node answered MOVED/ASK: the batch must go again through redis-py's cluster client."""


class RedisClusterTier(RedisTier):
    """``url``: ``redis://[user:password@]host:port`` or ``rediss://...`` (TLS) of any node;
    the others are discovered. ``?ssl_ca_certs=...&ssl_certfile=...&ssl_keyfile=...`` name
    the TLS files."""

    def _make_client(self, url: str, timeout: float, connect_timeout: float):
        u = urlparse(url)
        self._tls = u.scheme == "rediss"
        auth = f"{u.username or ''}:{u.password}@" if u.password else ""
        self._node_url = lambda host, port: f"redis://{auth}{host}:{port}"
        tls = {k: v[0] for k, v in parse_qs(u.query).items() if k.startswith("ssl_")}
        return RedisCluster(
            host=u.hostname or "127.0.0.1",
            port=u.port or 6379,
            username=u.username,
            password=u.password,
            ssl=u.scheme == "rediss",
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            require_full_coverage=False,  # a slot without a master is a miss, not an outage
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            protocol=2,
            **tls,
        )

    def _by_node(self, rkeys: list[bytes]) -> dict[str, list[int]] | None:
        """Indexes of ``rkeys`` grouped by the URL of the master owning each one's slot; None
        when the fast path cannot be taken (TLS, or the slot map not learnt yet)."""
        manager = self._client.nodes_manager
        if self._tls or not manager.slots_cache:
            return None
        groups: dict[str, list[int]] = {}
        for i, rkey in enumerate(rkeys):
            try:
                node = manager.get_node_from_slot(self._client.keyslot(rkey))
            except (RedisClusterException, IndexError):
                return None  # a slot without a master: let redis-py's path decide
            groups.setdefault(self._node_url(node.host, node.port), []).append(i)
        return groups

    async def _per_node(self, groups: dict[str, list[int]], op) -> list:
        """``op(conn, indexes)`` on each node concurrently; a node's failure fails the call
        (its keys are unknown, the caller's contract makes that a miss or a refused put)."""

        async def one(url: str, idx: list[int]):
            return await self._on_connection(lambda conn: op(conn, idx), url)

        return await asyncio.gather(*(one(url, idx) for url, idx in groups.items()))

    async def _send(
        self, values: list[tuple[bytes, tuple[bytes, bytes | memoryview]]], sizes: list[int]
    ) -> bool:
        groups = self._by_node([rkey for rkey, _ in values])
        if groups is not None:

            async def send_node(conn: RespConnection, idx: list[int]) -> None:
                for group in _round_trips([sizes[i] for i in idx]):
                    await conn.set_many([values[idx[j]] for j in group])

            try:
                return await self._call(lambda: self._fast(self._per_node(groups, send_node)),
                                        False)  # fmt: skip
            except _Rerouted:
                pass  # the slot map was stale: redis-py's pipeline follows MOVED/ASK

        async def send() -> bool:
            pipe = self._client.pipeline(transaction=False)
            for rkey, (header, payload) in values:
                pipe.set(rkey, header + bytes(payload))
            replies = await pipe.execute(raise_on_error=False)
            if any(isinstance(r, Exception) for r in replies):
                await self._refresh()
            return all(r is True for r in replies)

        return await self._call(send, False)

    async def _fetch(
        self, rkeys: list[bytes], sizes: list[int]
    ) -> list[Block | CorruptBlock | None] | None:
        groups = self._by_node(rkeys)
        if groups is not None:

            async def fetch_node(conn: RespConnection, idx: list[int]) -> list:
                got: list = []
                for group in _round_trips([sizes[i] for i in idx]):
                    got += await conn.get_each([rkeys[idx[j]] for j in group], _decoded)
                return got

            async def fetch_fast() -> list[Block | CorruptBlock | None]:
                out: list[Block | CorruptBlock | None] = [None] * len(rkeys)
                replies = await self._per_node(groups, fetch_node)
                for idx, got in zip(groups.values(), replies, strict=True):
                    for i, value in zip(idx, got, strict=True):
                        out[i] = value
                return out

            try:
                return await self._call(lambda: self._fast(fetch_fast()), None)
            except _Rerouted:
                pass

        async def fetch() -> list[Block | CorruptBlock | None] | None:
            pipe = self._client.pipeline(transaction=False)
            for rkey in rkeys:
                pipe.get(rkey)
            replies = await pipe.execute(raise_on_error=False)
            if any(isinstance(r, Exception) for r in replies):
                await self._refresh()
                return None  # a node failed mid-batch: a miss, the blocks may be fine
            return [_decoded(None if r is None else memoryview(r)) for r in replies]

        return await self._call(fetch, None)

    async def _fast(self, call: Awaitable[T]) -> T:
        """Await a fast-path call; a node that failed or answered MOVED/ASK makes us re-learn
        the slot map. MOVED/ASK raise _Rerouted (the data is fine, it moved); a failure is
        left to ``_call`` (a miss)."""
        try:
            return await call
        except RespError as e:
            await self._refresh()
            if "MOVED" in str(e) or "ASK" in str(e):
                raise _Rerouted from None
            raise
        except OSError:
            await self._refresh()
            raise

    async def scan(self) -> AsyncIterator[BlockMeta]:
        """Headers of every block on every master (start-up only; lookups never scan)."""
        batch: list[bytes] = []
        try:
            async for rkey in self._client.scan_iter(match=self.prefix + b"*", count=_SCAN_BATCH):
                batch.append(rkey)
                if len(batch) >= _SCAN_BATCH:
                    async for meta in self._headers(batch):
                        yield meta
                    batch = []
        except (RedisError, OSError):
            self.errors.io_error += 1
        if batch:
            async for meta in self._headers(batch):
                yield meta

    async def _refresh(self) -> None:
        """A node failed: re-learn which master owns which slot (a replica may have been
        promoted), so the next call goes to the new owner instead of the dead one."""
        try:
            await self._client.nodes_manager.initialize()
        except (RedisError, OSError):
            pass

    async def _probe(self) -> None:
        try:
            await self._client.initialize()
        except RedisClusterException as e:
            text = str(e)
            if any(s in text for s in ("password", "NOAUTH", "WRONGPASS", "NOPERM", "disabled")):
                raise AuthenticationError(text) from None
            raise RedisError(text) from None  # unreachable for now: misses until it is back
        await self._client.ping()
