"""Redis tier on a native Redis Cluster: every block key routed to the master that owns its
slot, MOVED/ASK and failover handled by redis-py's cluster client (topology refreshed on
errors), TLS (``rediss://``) and ACL users from the URL.

Same value format, accounting and failure contract as the single-server tier (redis.py):
one SET per block (a block is visible whole or not at all), checksum verified on every read,
every failure a miss or a refused put, a dead node skipped for ``retry_after``. Values go
through cluster pipelines (one per batch, fanned out per node by the client); the single-node
tier keeps its own zero-copy RESP path (tiers/resp.py), which a cluster would answer with
MOVED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlparse

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError

from tiers.base import Block, BlockMeta, CorruptBlock
from tiers.redis import RedisTier, _decoded

_SCAN_BATCH = 512


class RedisClusterTier(RedisTier):
    """``url``: ``redis://[user:password@]host:port`` or ``rediss://...`` (TLS) of any node;
    the others are discovered. ``?ssl_ca_certs=...&ssl_certfile=...&ssl_keyfile=...`` name
    the TLS files."""

    def _make_client(self, url: str, timeout: float, connect_timeout: float):
        u = urlparse(url)
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

    async def _send(
        self, values: list[tuple[bytes, tuple[bytes, bytes | memoryview]]], sizes: list[int]
    ) -> bool:
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
