"""The data-plane operations, once for both transports: each takes the service and the
request's validated fields and returns the answer document. ``server.py`` serves them as
HTTP endpoints, ``frames_server.py`` as frames on the same-host socket (PROTOCOL.md).

Every field is validated (protocol.Fields) before the service is called, so a bad request
is a typed error that changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from cacheservice.protocol import Fields, join_keys
from cacheservice.service import CacheService

Op = Callable[[CacheService, Fields], Awaitable[dict]]


async def namespace(svc: CacheService, f: Fields) -> dict:
    info = await svc.register_namespace_durable(f.namespace(), f.integer("block_bytes", lo=1))
    return {"ns": info.ns, "seed": info.seed, "block_bytes": info.block_bytes, "arena": info.arena}


async def lookup(svc: CacheService, f: Fields) -> dict:
    r = await svc.lookup(f.ns(), f.keys(), f.boolean("tiers", True))
    return {"hits": r.hits, "tiers": list(r.tiers)}


async def acquire(svc: CacheService, f: Fields) -> dict:
    ns, keys, lease_ms = f.ns(), f.keys(), f.opt_int("lease_ms", lo=1, hi=3_600_000)
    r = await svc.acquire(ns, keys, lease_ms, f.boolean("flat", False))
    doc = {"lease": r.lease, "slots": list(r.slots), "checksums": list(r.checksums)}
    return doc | {"lengths": list(r.lengths)}


async def release(svc: CacheService, f: Fields) -> dict:
    return {"released": svc.release(f.string("lease"))}


async def reserve(svc: CacheService, f: Fields) -> dict:
    r = await svc.reserve(f.ns(), f.keys(), f.parent(), f.boolean("chunk", False))
    return {"lease": r.lease, "slots": list(r.slots)}


async def commit(svc: CacheService, f: Fields) -> dict:
    lease, ok, sums = f.string("lease"), f.bool_list("ok"), f.checksum_list("checksums")
    return {"committed": await svc.commit(lease, ok, sums, f.checksum_list("spots"))}


async def exists(svc: CacheService, f: Fields) -> dict:
    return {"count": await svc.exists(f.ns(), f.keys())}


async def put_blocks(svc: CacheService, f: Fields) -> dict:
    ns, keys, parent = f.ns(), f.keys(), f.parent()
    data, flat = f.blob("data"), f.boolean("flat", False)
    return {"stored": await svc.put_blocks(ns, keys, parent, data, flat)}


async def get_blocks(svc: CacheService, f: Fields) -> dict:
    r = await svc.get_blocks(f.ns(), f.keys(), f.boolean("prefix", True))
    return {"count": r.count, "data": bytes(r.data), "present": list(r.present)}


async def register_chunk(svc: CacheService, f: Fields) -> dict:
    ns, chunk, keys = f.ns(), f.key("chunk"), f.keys()
    num_tokens, start_pos = f.integer("num_tokens", lo=1), f.integer("start_pos")
    ok = await svc.register_chunk(ns, chunk, num_tokens, start_pos, keys, f.opt_bin("data"))
    return {"registered": ok}


async def lookup_chunks(svc: CacheService, f: Fields) -> dict:
    entries = svc.lookup_chunks(f.ns(), f.key_list("chunks"))
    return {"entries": [None if e is None else _chunk_doc(e) for e in entries]}


def _chunk_doc(entry) -> dict:
    doc = {"num_tokens": entry.num_tokens, "start_pos": entry.start_pos}
    doc["keys"] = join_keys(entry.keys)
    doc["resident"] = bool(getattr(entry, "resident", True))
    return doc


# Path -> operation. Frames number them by their place here (frames.OPS): append only.
DATA_PLANE: dict[str, Op] = {
    "/v1/namespace": namespace,
    "/v1/lookup": lookup,
    "/v1/acquire": acquire,
    "/v1/release": release,
    "/v1/reserve": reserve,
    "/v1/commit": commit,
    "/v1/exists": exists,
    "/v1/blocks/put": put_blocks,
    "/v1/blocks/get": get_blocks,
    "/v1/chunks/register": register_chunk,
    "/v1/chunks/lookup": lookup_chunks,
}
