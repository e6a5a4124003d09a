"""Clients for the control plane: ``CacheClient`` (sync, for engine threads, here) and
``AsyncCacheClient`` (aiohttp, ``aclient.py``, re-exported here). Both speak to
``http://host:port`` or ``unix:///path.sock`` and build their requests from ``calls.py``.

Failure contract: the service being down, timing out or answering 5xx raises
``ServiceUnavailable`` (connectors treat it as a miss / skipped store); a 4xx raises the typed
error named by the body's ``error`` code.
"""

from __future__ import annotations

import http.client
import socket
import threading
from typing import TYPE_CHECKING, Any

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
from cacheservice.frames import FramesLane
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

if TYPE_CHECKING:
    from cacheservice.aclient import AsyncCacheClient

__all__ = ["DEFAULT_URL", "AsyncCacheClient", "CacheClient"]


def __getattr__(name: str):
    # AsyncCacheClient needs aiohttp; an engine's connector using the sync client does not.
    if name == "AsyncCacheClient":
        from cacheservice.aclient import AsyncCacheClient

        return AsyncCacheClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        frames: bool = True,
    ):
        """``frames``: data-plane calls go over the service's same-host frames socket when
        it advertises one (frames.py); off, or on another host, everything is HTTP."""
        self.url = url.rstrip("/")
        self._unix, self._host, self._port = split_url(self.url)
        self._timeouts = (timeout, min(connect_timeout, timeout))
        self._headers = headers(token)
        host = None if self._unix else self._host
        self._lane = FramesLane(
            host, self._headers.get("Authorization", "")[len("Bearer ") :] or None,
            self._timeouts, lambda path: self._send("GET", path, None),
        )  # fmt: skip
        self._lane.enabled &= frames
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
            cut = False
            try:
                try:
                    conn.request(method, path, body=body, headers=self._headers)
                except (BrokenPipeError, ConnectionResetError):
                    # A service that rejects a body (413) answers and closes before reading
                    # it all: its answer is already here. Otherwise the send error stands.
                    if not body or conn.sock is None:
                        raise
                    cut = True
                    conn.sock.settimeout(0.05)
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
            if resp.will_close or cut:
                self._drop()
            return resp.status, data
        raise AssertionError("unreachable: the loop returns or raises")

    def _do(self, call: Call) -> Any:
        body = call.encode()
        if call.method == "POST" and (answer := self._lane.call(call.path, body or b"")):
            return call.result(*answer)
        return call.result(*self._send(call.method, call.path, body))

    @property
    def transport(self) -> str:
        """ "frames" once data-plane calls use the frames socket, else "http"."""
        return "frames" if self._lane.path is not None else "http"

    def health(self) -> bool:
        try:
            status, data = self._send("GET", "/health", None)
        except ServiceUnavailable:
            return False
        return health_ok(status, data)

    def metrics(self) -> str:
        return metrics_text(*self._send("GET", "/metrics", None))

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()
        self._lane.close()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, ns: Namespace, block_bytes: int) -> NamespaceInfo:
        return self._do(Requests.register(ns, block_bytes))

    def lookup(self, ns: str, keys: list[bytes], tiers: bool = True) -> LookupResult:
        """The longest stored prefix of ``keys`` and each block's fastest tier; ``tiers``
        False: its length only (``tiers`` empty), the service's cheapest answer."""
        return self._do(Requests.lookup(ns, keys, tiers))

    def acquire(
        self, ns: str, keys: list[bytes], lease_ms: int | None = None, flat: bool = False
    ) -> AcquireResult:
        return self._do(Requests.acquire(ns, keys, lease_ms, flat))

    def release(self, lease: str) -> int:
        return self._do(Requests.release(lease))

    def reserve(
        self, ns: str, keys: list[bytes], parent: bytes = ROOT_KEY, chunk: bool = False
    ) -> ReserveResult:
        """``chunk``: ``parent`` is a chunk's key, the root of a chunk's block chain."""
        return self._do(Requests.reserve(ns, keys, parent, chunk))

    def commit(
        self,
        lease: str,
        ok: list[bool] | None = None,
        checksums: list[int | None] | None = None,
        spots: list[int | None] | None = None,
    ) -> int:
        """``checksums``/``spots``: per reserved key, the xxh3_64 and the
        ``index.hashing.spot_checksum`` of the bytes written; with both, the service checks
        the spots only (PROTOCOL.md)."""
        return self._do(Requests.commit(lease, ok, checksums, spots))

    def exists(self, ns: str, keys: list[bytes]) -> int:
        return self._do(Requests.exists(ns, keys))

    def put_blocks(
        self,
        ns: str,
        keys: list[bytes],
        data: bytes | memoryview,
        parent: bytes = ROOT_KEY,
        flat: bool = False,
    ) -> int:
        return self._do(Requests.put_blocks(ns, keys, data, parent, flat))

    def get_blocks(self, ns: str, keys: list[bytes], prefix: bool = True) -> GetBlocksResult:
        return self._do(Requests.get_blocks(ns, keys, prefix))

    def register_chunk(
        self,
        ns: str,
        chunk: bytes,
        num_tokens: int,
        start_pos: int,
        keys: list[bytes],
        data: bytes | None = None,
    ) -> bool:
        return self._do(Requests.register_chunk(ns, chunk, num_tokens, start_pos, keys, data))

    def lookup_chunks(self, ns: str, chunks: list[bytes]) -> list[ChunkEntry | None]:
        return self._do(Requests.lookup_chunks(ns, chunks))

    def stats(self) -> dict:
        return self._do(Requests.stats())

    def register_engine(self, spec: EngineSpec) -> bool:
        """Have the service follow an engine's KV events; True when it was not followed yet
        with this spec (calling again is cheap: connectors do it periodically)."""
        return self._do(Requests.register_engine(spec))

    def unregister_engine(self, engine: str) -> bool:
        return self._do(Requests.unregister_engine(engine))

    def engines(self) -> list[dict]:
        return self._do(Requests.engines())

    def route(
        self,
        ns: str,
        keys: list[bytes],
        num_tokens: int | None = None,
        prefill_tokens_per_s: float | None = None,
    ) -> RouteResult:
        """Per engine of ``ns``: tokens of this prompt in its own cache, loadable from each
        tier, to compute, and the estimated cost; ``best`` is the cheapest connected one."""
        return self._do(Requests.route(ns, keys, num_tokens, prefill_tokens_per_s))

    def plan(self, ns: str, segments: list[Segment]) -> Plan:
        """The order to send ``segments`` in and what each will hit (index/planner.py)."""
        return self._do(Requests.plan(ns, segments))

    def plan_batch(self, ns: str, requests: list[list[Segment]]) -> BatchPlan:
        """Plan pending requests together: send order, groups and each one's plan."""
        return self._do(Requests.plan_batch(ns, requests))

    def namespaces(self) -> list[dict]:
        """Registered namespaces: their fields, ``id`` and ``block_bytes``."""
        return self._do(Requests.namespaces())
