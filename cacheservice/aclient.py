"""``AsyncCacheClient``: the asyncio twin of ``CacheClient`` over aiohttp, sending the same
``calls.Requests`` (see ``client.py`` for the failure contract)."""

from __future__ import annotations

from typing import Any

import aiohttp

from cacheservice.calls import (
    DEFAULT_URL,
    Call,
    Requests,
    headers,
    health_ok,
    metrics_text,
    split_url,
)
from cacheservice.errors import ServiceUnavailable
from cacheservice.results import (
    AcquireResult,
    EngineSpec,
    GetBlocksResult,
    LookupResult,
    NamespaceInfo,
    ReserveResult,
    RouteResult,
)
from index.chunks import ChunkEntry
from index.hashing import ROOT_KEY, Namespace
from index.planner import BatchPlan, Plan, Segment


class AsyncCacheClient:
    """asyncio client over aiohttp; create and use it inside one event loop."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 1.0,
    ):
        self.url = url.rstrip("/")
        self._unix, host, port = split_url(self.url)
        self._base = f"http://{host}:{port}" if self._unix is None else "http://localhost"
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=min(connect_timeout, timeout)
        )
        self._headers = headers(token)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.UnixConnector(self._unix) if self._unix else None
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, headers=self._headers
            )
        return self._session

    async def _send(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        try:
            async with self._get_session().request(method, self._base + path, data=body) as r:
                return r.status, await r.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise ServiceUnavailable(f"cannot reach cacheservice at {self.url}: {e!r}") from None

    async def _do(self, call: Call) -> Any:
        return call.result(*await self._send(call.method, call.path, call.encode()))

    async def health(self) -> bool:
        try:
            status, data = await self._send("GET", "/health", None)
        except ServiceUnavailable:
            return False
        return health_ok(status, data)

    async def metrics(self) -> str:
        return metrics_text(*await self._send("GET", "/metrics", None))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncCacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def register(self, ns: Namespace, block_bytes: int) -> NamespaceInfo:
        return await self._do(Requests.register(ns, block_bytes))

    async def lookup(self, ns: str, keys: list[bytes], tiers: bool = True) -> LookupResult:
        """The longest stored prefix of ``keys`` and each block's fastest tier; ``tiers``
        False: its length only (``tiers`` empty), the service's cheapest answer."""
        return await self._do(Requests.lookup(ns, keys, tiers))

    async def acquire(
        self, ns: str, keys: list[bytes], lease_ms: int | None = None, flat: bool = False
    ) -> AcquireResult:
        return await self._do(Requests.acquire(ns, keys, lease_ms, flat))

    async def release(self, lease: str) -> int:
        return await self._do(Requests.release(lease))

    async def reserve(
        self, ns: str, keys: list[bytes], parent: bytes = ROOT_KEY, chunk: bool = False
    ) -> ReserveResult:
        return await self._do(Requests.reserve(ns, keys, parent, chunk))

    async def commit(
        self,
        lease: str,
        ok: list[bool] | None = None,
        checksums: list[int | None] | None = None,
        spots: list[int | None] | None = None,
    ) -> int:
        """``checksums``/``spots``: per reserved key, the xxh3_64 and the
        ``index.hashing.spot_checksum`` of the bytes written; with both, the service checks
        the spots only (PROTOCOL.md)."""
        return await self._do(Requests.commit(lease, ok, checksums, spots))

    async def exists(self, ns: str, keys: list[bytes]) -> int:
        return await self._do(Requests.exists(ns, keys))

    async def put_blocks(
        self,
        ns: str,
        keys: list[bytes],
        data: bytes | memoryview,
        parent: bytes = ROOT_KEY,
        flat: bool = False,
    ) -> int:
        return await self._do(Requests.put_blocks(ns, keys, data, parent, flat))

    async def get_blocks(self, ns: str, keys: list[bytes], prefix: bool = True) -> GetBlocksResult:
        return await self._do(Requests.get_blocks(ns, keys, prefix))

    async def register_chunk(
        self,
        ns: str,
        chunk: bytes,
        num_tokens: int,
        start_pos: int,
        keys: list[bytes],
        data: bytes | None = None,
    ) -> bool:
        return await self._do(Requests.register_chunk(ns, chunk, num_tokens, start_pos, keys, data))

    async def lookup_chunks(self, ns: str, chunks: list[bytes]) -> list[ChunkEntry | None]:
        return await self._do(Requests.lookup_chunks(ns, chunks))

    async def stats(self) -> dict:
        return await self._do(Requests.stats())

    async def register_engine(self, spec: EngineSpec) -> bool:
        return await self._do(Requests.register_engine(spec))

    async def unregister_engine(self, engine: str) -> bool:
        return await self._do(Requests.unregister_engine(engine))

    async def engines(self) -> list[dict]:
        return await self._do(Requests.engines())

    async def route(
        self,
        ns: str,
        keys: list[bytes],
        num_tokens: int | None = None,
        prefill_tokens_per_s: float | None = None,
    ) -> RouteResult:
        return await self._do(Requests.route(ns, keys, num_tokens, prefill_tokens_per_s))

    async def plan(self, ns: str, segments: list[Segment]) -> Plan:
        """The order to send ``segments`` in and what each will hit (index/planner.py)."""
        return await self._do(Requests.plan(ns, segments))

    async def plan_batch(self, ns: str, requests: list[list[Segment]]) -> BatchPlan:
        """Plan pending requests together: send order, groups and each one's plan."""
        return await self._do(Requests.plan_batch(ns, requests))

    async def namespaces(self) -> list[dict]:
        """Registered namespaces: their fields, ``id`` and ``block_bytes``."""
        return await self._do(Requests.namespaces())
