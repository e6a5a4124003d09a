"""Request descriptions shared by ``CacheClient`` and ``AsyncCacheClient``.

Each request is described once (``Call``: method, path, body, result parser) and turned from
an HTTP answer into its result once, so the two clients only differ in how they send it.
A 4xx or 5xx answer raises the typed error named by the body's ``error`` code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, NamedTuple

from cacheservice.protocol import CONTENT_TYPE, error_for, join_keys, pack, split_keys, unpack
from cacheservice.results import (
    AcquireResult,
    EngineRoute,
    EngineSpec,
    GetBlocksResult,
    LookupResult,
    NamespaceInfo,
    ReserveResult,
    RouteResult,
)
from cacheservice.tokens import client_token
from index.chunks import ChunkEntry
from index.hashing import ROOT_KEY, Namespace
from index.planner import KINDS, BatchPlan, Plan, Segment, SegmentPlan

DEFAULT_URL = "http://127.0.0.1:8642"


class Call(NamedTuple):
    method: str
    path: str
    body: dict | None
    parse: Callable[[Any], Any]

    def encode(self) -> bytes | None:
        if self.body is None:
            return None
        return pack({k: v for k, v in self.body.items() if v is not None})

    def result(self, status: int, data: bytes) -> Any:
        if status >= 300:
            raise error_for(status, data)
        return self.parse(unpack(data))


def _build(cls: type, doc: dict) -> Any:
    """Construct a result type from the response map, ignoring extra wire fields."""
    names = cls._fields if hasattr(cls, "_fields") else [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: doc[n] for n in names if n in doc})


def _chunk_entry(doc: dict | None) -> ChunkEntry | None:
    if doc is None:
        return None
    return _build(ChunkEntry, {**doc, "keys": split_keys(doc["keys"])})


def _post(path: str, body: dict, parse: Callable[[Any], Any]) -> Call:
    return Call("POST", path, body, parse)


class Requests:
    """Pure request builders, one per PROTOCOL.md endpoint."""

    @staticmethod
    def register(ns: Namespace, block_bytes: int) -> Call:
        body = {"namespace": ns.to_dict(), "block_bytes": block_bytes}
        return _post("/v1/namespace", body, lambda d: _build(NamespaceInfo, d))

    @staticmethod
    def lookup(ns: str, keys: list[bytes], tiers: bool = True) -> Call:
        body = {"ns": ns, "keys": join_keys(keys), "tiers": None if tiers else False}
        return _post("/v1/lookup", body, lambda d: _build(LookupResult, d))

    @staticmethod
    def acquire(
        ns: str, keys: list[bytes], lease_ms: int | None = None, flat: bool = False
    ) -> Call:
        body = {"ns": ns, "keys": join_keys(keys), "lease_ms": lease_ms, "flat": flat}
        return _post("/v1/acquire", body, lambda d: _build(AcquireResult, d))

    @staticmethod
    def release(lease: str) -> Call:
        return _post("/v1/release", {"lease": lease}, lambda d: d["released"])

    @staticmethod
    def reserve(ns: str, keys: list[bytes], parent: bytes = ROOT_KEY, chunk: bool = False) -> Call:
        body = {"ns": ns, "keys": join_keys(keys), "parent": parent}
        if chunk:
            body["chunk"] = True
        return _post("/v1/reserve", body, lambda d: _build(ReserveResult, d))

    @staticmethod
    def commit(
        lease: str,
        ok: list[bool] | None = None,
        checksums: list[int | None] | None = None,
        spots: list[int | None] | None = None,
    ) -> Call:
        body = {"lease": lease, "ok": ok, "checksums": checksums, "spots": spots}
        return _post("/v1/commit", body, lambda d: d["committed"])

    @staticmethod
    def exists(ns: str, keys: list[bytes]) -> Call:
        return _post("/v1/exists", {"ns": ns, "keys": join_keys(keys)}, lambda d: d["count"])

    @staticmethod
    def put_blocks(
        ns: str, keys: list[bytes], data: bytes, parent: bytes = ROOT_KEY, flat: bool = False
    ) -> Call:
        body = {"ns": ns, "keys": join_keys(keys), "parent": parent, "data": bytes(data)}
        body["flat"] = flat
        return _post("/v1/blocks/put", body, lambda d: d["stored"])

    @staticmethod
    def get_blocks(ns: str, keys: list[bytes], prefix: bool = True) -> Call:
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
    ) -> Call:
        body = {"ns": ns, "chunk": chunk, "num_tokens": num_tokens, "start_pos": start_pos}
        body |= {"keys": join_keys(keys), "data": None if data is None else bytes(data)}
        return _post("/v1/chunks/register", body, lambda d: d["registered"])

    @staticmethod
    def lookup_chunks(ns: str, chunks: list[bytes]) -> Call:
        body = {"ns": ns, "chunks": list(chunks)}
        return _post("/v1/chunks/lookup", body, lambda d: [_chunk_entry(e) for e in d["entries"]])

    @staticmethod
    def stats() -> Call:
        return Call("GET", "/v1/stats", None, lambda d: d)

    @staticmethod
    def namespaces() -> Call:
        return Call("GET", "/v1/namespaces", None, lambda d: d["namespaces"])

    @staticmethod
    def register_engine(spec: EngineSpec) -> Call:
        return _post("/v1/engines/register", dataclasses.asdict(spec), lambda d: d["new"])

    @staticmethod
    def unregister_engine(engine: str) -> Call:
        return _post("/v1/engines/unregister", {"engine": engine}, lambda d: d["removed"])

    @staticmethod
    def engines() -> Call:
        return Call("GET", "/v1/engines", None, lambda d: d["engines"])

    @staticmethod
    def plan(ns: str, segments: list[Segment]) -> Call:
        return _post("/v1/plan", {"ns": ns, **_segments([list(segments)])}, _plan)

    @staticmethod
    def plan_batch(ns: str, requests: list[list[Segment]]) -> Call:
        body = {"ns": ns, **_segments(requests), "requests": [len(r) for r in requests]}
        return _post("/v1/plan/batch", body, _batch_plan)

    @staticmethod
    def route(
        ns: str,
        keys: list[bytes],
        num_tokens: int | None = None,
        prefill_tokens_per_s: float | None = None,
    ) -> Call:
        body = {"ns": ns, "keys": join_keys(keys), "num_tokens": num_tokens}
        body["prefill_tokens_per_s"] = prefill_tokens_per_s
        return _post("/v1/route", body, _route)


def _segments(requests: list[list[Segment]]) -> dict:
    """Segments as /v1/plan's parallel arrays (planning.py on the service side)."""
    segs = [s for r in requests for s in r]
    letter = {v: k for k, v in KINDS.items()}
    ranks = [s.rank for s in segs]
    return {
        "tokens": b"".join(s.tokens.astype("<u4", copy=False).tobytes() for s in segs),
        "lengths": [len(s.tokens) for s in segs],
        "kinds": "".join(letter[s.kind] for s in segs),
        "ranks": ranks if any(r is not None for r in ranks) else None,
    }


def _plan(doc: dict) -> Plan:
    segments = [SegmentPlan(*s) for s in doc["segments"]]
    return Plan(doc["order"], segments, doc["dropped"], doc["prefix_tokens"],
                doc["chunk_tokens"], doc["num_tokens"])  # fmt: skip


def _batch_plan(doc: dict) -> BatchPlan:
    return BatchPlan(doc["order"], doc["groups"], [_plan(p) for p in doc["plans"]])


def _route(doc: dict) -> RouteResult:
    engines = [_build(EngineRoute, e) for e in doc["engines"]]
    return RouteResult(doc["best"], doc["num_tokens"], engines)


def headers(token: str | None) -> dict[str, str]:
    """Request headers; without an explicit token, the same-user default (tokens.py)."""
    out = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE}
    token = client_token(token)
    if token:
        out["Authorization"] = f"Bearer {token}"
    return out


def split_url(url: str) -> tuple[str | None, str, int]:
    """-> (unix socket path or None, host, port)."""
    if url.startswith("unix://"):
        return url[len("unix://") :], "localhost", 0
    if not url.startswith("http://"):
        raise ValueError(f"url must be http://host:port or unix:///path.sock, got {url!r}")
    hostport = url[len("http://") :].rstrip("/")
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "80")
    return None, host.strip("[]"), int(port)


def health_ok(status: int, data: bytes) -> bool:
    return status == 200 and json.loads(data).get("status") == "ok"


def metrics_text(status: int, data: bytes) -> str:
    if status >= 300:
        raise error_for(status, data)
    return data.decode()
