"""Clients for the control plane: ``CacheClient`` (sync, for engine threads) and
``AsyncCacheClient`` (aiohttp). Both speak to ``http://host:port`` or ``unix:///path.sock``.

Failure contract: the service being down, timing out or answering 5xx raises
``ServiceUnavailable`` (connectors treat it as a miss / skipped store); a 4xx raises the typed
error named by the body's ``error`` code. Each request is described once (``_Call``: path, body,
result parser) and both clients only differ in how they send it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import socket
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp

from cacheservice.errors import ServiceUnavailable
from cacheservice.protocol import CONTENT_TYPE, error_for, join_keys, pack, split_keys, unpack
from cacheservice.service import (
    AcquireResult,
    GetBlocksResult,
    LookupResult,
    NamespaceInfo,
    ReserveResult,
)
from index.chunks import ChunkEntry
from index.hashing import ROOT_KEY, Namespace

DEFAULT_URL = "http://127.0.0.1:8642"


class _Call(NamedTuple):
    method: str
    path: str
    body: dict | None
    parse: Callable[[Any], Any]


def _build(cls: type, doc: dict) -> Any:
    """Construct a result type from the response map, ignoring extra wire fields."""
    names = cls._fields if hasattr(cls, "_fields") else [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: doc[n] for n in names if n in doc})


def _chunk_entry(doc: dict | None) -> ChunkEntry | None:
    if doc is None:
        return None
    return _build(ChunkEntry, {**doc, "keys": split_keys(doc["keys"])})


def _post(path: str, body: dict, parse: Callable[[Any], Any]) -> _Call:
    return _Call("POST", path, body, parse)


class _Requests:
    """Pure request builders shared by the two clients."""

    @staticmethod
    def register(ns: Namespace, block_bytes: int) -> _Call:
        body = {"namespace": ns.to_dict(), "block_bytes": block_bytes}
        return _post("/v1/namespace", body, lambda d: _build(NamespaceInfo, d))

    @staticmethod
    def lookup(ns: str, keys: list[bytes]) -> _Call:
        body = {"ns": ns, "keys": join_keys(keys)}
        return _post("/v1/lookup", body, lambda d: _build(LookupResult, d))

    @staticmethod
    def acquire(ns: str, keys: list[bytes], lease_ms: int | None = None) -> _Call:
        body = {"ns": ns, "keys": join_keys(keys), "lease_ms": lease_ms}
        return _post("/v1/acquire", body, lambda d: _build(AcquireResult, d))

    @staticmethod
    def release(lease: str) -> _Call:
        return _post("/v1/release", {"lease": lease}, lambda d: d["released"])

    @staticmethod
    def reserve(ns: str, keys: list[bytes], parent: bytes = ROOT_KEY) -> _Call:
        body = {"ns": ns, "keys": join_keys(keys), "parent": parent}
        return _post("/v1/reserve", body, lambda d: _build(ReserveResult, d))

    @staticmethod
    def commit(lease: str, ok: list[bool] | None = None) -> _Call:
        return _post("/v1/commit", {"lease": lease, "ok": ok}, lambda d: d["committed"])

    @staticmethod
    def exists(ns: str, keys: list[bytes]) -> _Call:
        return _post("/v1/exists", {"ns": ns, "keys": join_keys(keys)}, lambda d: d["count"])

    @staticmethod
    def put_blocks(
        ns: str, keys: list[bytes], data: bytes, parent: bytes = ROOT_KEY, flat: bool = False
    ) -> _Call:
        body = {"ns": ns, "keys": join_keys(keys), "parent": parent, "data": bytes(data)}
        body["flat"] = flat
        return _post("/v1/blocks/put", body, lambda d: d["stored"])

    @staticmethod
    def get_blocks(ns: str, keys: list[bytes], prefix: bool = True) -> _Call:
        body = {"ns": ns, "keys": join_keys(keys), "prefix": prefix}
        return _post("/v1/blocks/get", body, lambda d: _build(GetBlocksResult, d))

    @staticmethod
    def register_chunk(
        ns: str,
        chunk: bytes,
        num_tokens: int,
        start_pos: int,
        keys: list[bytes],
        data: bytes | None = None,
    ) -> _Call:
        body = {"ns": ns, "chunk": chunk, "num_tokens": num_tokens, "start_pos": start_pos}
        body |= {"keys": join_keys(keys), "data": None if data is None else bytes(data)}
        return _post("/v1/chunks/register", body, lambda d: d["registered"])

    @staticmethod
    def lookup_chunks(ns: str, chunks: list[bytes]) -> _Call:
        body = {"ns": ns, "chunks": list(chunks)}
        return _post("/v1/chunks/lookup", body, lambda d: [_chunk_entry(e) for e in d["entries"]])

    @staticmethod
    def stats() -> _Call:
        return _Call("GET", "/v1/stats", None, lambda d: d)


def _encode(call: _Call) -> bytes | None:
    if call.body is None:
        return None
    return pack({k: v for k, v in call.body.items() if v is not None})


def _split_url(url: str) -> tuple[str | None, str, int]:
    """-> (unix socket path or None, host, port)."""
    if url.startswith("unix://"):
        return url[len("unix://") :], "localhost", 0
    if not url.startswith("http://"):
        raise ValueError(f"url must be http://host:port or unix:///path.sock, got {url!r}")
    hostport = url[len("http://") :].rstrip("/")
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "80")
    return None, host.strip("[]"), int(port)


class _Connection(http.client.HTTPConnection):
    """Keep-alive connection over TCP or a unix socket with a short connect timeout, so a
    service that is down is reported in milliseconds rather than after the read timeout."""

    def __init__(self, unix: str | None, host: str, port: int, timeout: float, connect: float):
        super().__init__(host, port or None, timeout=timeout)
        self.unix, self.connect_timeout = unix, connect

    def connect(self) -> None:
        if self.unix is None:
            sock = socket.create_connection((self.host, self.port), self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.connect_timeout)
            try:
                sock.connect(self.unix)
            except OSError:
                sock.close()
                raise
        sock.settimeout(self.timeout)
        self.sock = sock


_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class CacheClient:
    """Blocking client; safe to share between threads (one keep-alive connection each)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 1.0,
    ):
        self.url = url.rstrip("/")
        self._unix, self._host, self._port = _split_url(self.url)
        self._timeouts = (timeout, min(connect_timeout, timeout))
        self._headers = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        # One keep-alive connection per calling thread: engines call from worker threads.
        self._local = threading.local()
        self._all: list[_Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> tuple[_Connection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        conn = _Connection(self._unix, self._host, self._port, *self._timeouts)
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn, False

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                self._all.remove(conn)

    def _send(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        for attempt in range(2):
            conn, reused = self._conn()
            try:
                conn.request(method, path, body=body, headers=self._headers)
                resp = conn.getresponse()
                data = resp.read()
            except _STALE as e:
                self._drop()
                if reused and attempt == 0:
                    # The server closed an idle keep-alive connection before reading the
                    # request (aiohttp's keepalive_timeout): send it once more, fresh.
                    continue
                raise ServiceUnavailable(f"cacheservice at {self.url} dropped the call: {e}") from e
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                raise ServiceUnavailable(f"cannot reach cacheservice at {self.url}: {e!r}") from e
            if resp.will_close:
                self._drop()
            return resp.status, data
        raise AssertionError("unreachable: the loop returns or raises")

    def _do(self, call: _Call) -> Any:
        status, data = self._send(call.method, call.path, _encode(call))
        if status >= 300:
            raise error_for(status, data)
        return call.parse(unpack(data))

    def health(self) -> bool:
        try:
            status, data = self._send("GET", "/health", None)
        except ServiceUnavailable:
            return False
        return status == 200 and json.loads(data).get("status") == "ok"

    def metrics(self) -> str:
        status, data = self._send("GET", "/metrics", None)
        if status >= 300:
            raise error_for(status, data)
        return data.decode()

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, ns: Namespace, block_bytes: int) -> NamespaceInfo:
        return self._do(_Requests.register(ns, block_bytes))

    def lookup(self, ns: str, keys: list[bytes]) -> LookupResult:
        return self._do(_Requests.lookup(ns, keys))

    def acquire(self, ns: str, keys: list[bytes], lease_ms: int | None = None) -> AcquireResult:
        return self._do(_Requests.acquire(ns, keys, lease_ms))

    def release(self, lease: str) -> int:
        return self._do(_Requests.release(lease))

    def reserve(self, ns: str, keys: list[bytes], parent: bytes = ROOT_KEY) -> ReserveResult:
        return self._do(_Requests.reserve(ns, keys, parent))

    def commit(self, lease: str, ok: list[bool] | None = None) -> int:
        return self._do(_Requests.commit(lease, ok))

    def exists(self, ns: str, keys: list[bytes]) -> int:
        return self._do(_Requests.exists(ns, keys))

    def put_blocks(
        self,
        ns: str,
        keys: list[bytes],
        data: bytes | memoryview,
        parent: bytes = ROOT_KEY,
        flat: bool = False,
    ) -> int:
        return self._do(_Requests.put_blocks(ns, keys, data, parent, flat))

    def get_blocks(self, ns: str, keys: list[bytes], prefix: bool = True) -> GetBlocksResult:
        return self._do(_Requests.get_blocks(ns, keys, prefix))

    def register_chunk(
        self,
        ns: str,
        chunk: bytes,
        num_tokens: int,
        start_pos: int,
        keys: list[bytes],
        data: bytes | None = None,
    ) -> bool:
        return self._do(_Requests.register_chunk(ns, chunk, num_tokens, start_pos, keys, data))

    def lookup_chunks(self, ns: str, chunks: list[bytes]) -> list[ChunkEntry | None]:
        return self._do(_Requests.lookup_chunks(ns, chunks))

    def stats(self) -> dict:
        return self._do(_Requests.stats())


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
        self._unix, host, port = _split_url(self.url)
        self._base = f"http://{host}:{port}" if self._unix is None else "http://localhost"
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=min(connect_timeout, timeout)
        )
        self._headers = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
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
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise ServiceUnavailable(f"cannot reach cacheservice at {self.url}: {e!r}") from None

    async def _do(self, call: _Call) -> Any:
        status, data = await self._send(call.method, call.path, _encode(call))
        if status >= 300:
            raise error_for(status, data)
        return call.parse(unpack(data))

    async def health(self) -> bool:
        try:
            status, data = await self._send("GET", "/health", None)
        except ServiceUnavailable:
            return False
        return status == 200 and json.loads(data).get("status") == "ok"

    async def metrics(self) -> str:
        status, data = await self._send("GET", "/metrics", None)
        if status >= 300:
            raise error_for(status, data)
        return data.decode()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncCacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def register(self, ns: Namespace, block_bytes: int) -> NamespaceInfo:
        return await self._do(_Requests.register(ns, block_bytes))

    async def lookup(self, ns: str, keys: list[bytes]) -> LookupResult:
        return await self._do(_Requests.lookup(ns, keys))

    async def acquire(
        self, ns: str, keys: list[bytes], lease_ms: int | None = None
    ) -> AcquireResult:
        return await self._do(_Requests.acquire(ns, keys, lease_ms))

    async def release(self, lease: str) -> int:
        return await self._do(_Requests.release(lease))

    async def reserve(self, ns: str, keys: list[bytes], parent: bytes = ROOT_KEY) -> ReserveResult:
        return await self._do(_Requests.reserve(ns, keys, parent))

    async def commit(self, lease: str, ok: list[bool] | None = None) -> int:
        return await self._do(_Requests.commit(lease, ok))

    async def exists(self, ns: str, keys: list[bytes]) -> int:
        return await self._do(_Requests.exists(ns, keys))

    async def put_blocks(
        self,
        ns: str,
        keys: list[bytes],
        data: bytes | memoryview,
        parent: bytes = ROOT_KEY,
        flat: bool = False,
    ) -> int:
        return await self._do(_Requests.put_blocks(ns, keys, data, parent, flat))

    async def get_blocks(self, ns: str, keys: list[bytes], prefix: bool = True) -> GetBlocksResult:
        return await self._do(_Requests.get_blocks(ns, keys, prefix))

    async def register_chunk(
        self,
        ns: str,
        chunk: bytes,
        num_tokens: int,
        start_pos: int,
        keys: list[bytes],
        data: bytes | None = None,
    ) -> bool:
        return await self._do(
            _Requests.register_chunk(ns, chunk, num_tokens, start_pos, keys, data)
        )

    async def lookup_chunks(self, ns: str, chunks: list[bytes]) -> list[ChunkEntry | None]:
        return await self._do(_Requests.lookup_chunks(ns, chunks))

    async def stats(self) -> dict:
        return await self._do(_Requests.stats())
