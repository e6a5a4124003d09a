"""Handlers of the engines, routing and planning endpoints (PROTOCOL.md, "Engines and routing"
and "Planning"): thin over ``Fleet`` (fleet.py) and ``Planning`` (planning.py)."""

from __future__ import annotations

from aiohttp import web

from cacheservice import validate
from cacheservice.errors import BadRequest
from cacheservice.planning import decode_segments, plan_doc
from cacheservice.protocol import Fields
from cacheservice.results import EngineSpec
from cacheservice.webstate import FLEET_KEY, PLANNING_KEY
from cacheservice.webstate import fields as _fields
from cacheservice.webstate import reply as _reply
from cacheservice.webstate import service as _svc

routes = web.RouteTableDef()


@routes.post("/v1/engines/register")
async def register_engine(request: web.Request) -> web.Response:
    f = await _fields(request)
    spec = EngineSpec(
        f.string("engine"),
        f.ns(),
        f.string("endpoint"),
        f.opt_string("replay_endpoint"),
        f.string("topic", ""),
        f.string("url", ""),
    )
    return _reply({"new": await request.app[FLEET_KEY].register(spec)})


@routes.post("/v1/engines/unregister")
async def unregister_engine(request: web.Request) -> web.Response:
    f = await _fields(request)
    return _reply({"removed": await request.app[FLEET_KEY].unregister(f.string("engine"))})


@routes.get("/v1/engines")
async def engines(request: web.Request) -> web.Response:
    fleet = request.app[FLEET_KEY]
    return _reply({"engines": fleet.describe(), "rates": fleet.rates.snapshot()})


@routes.post("/v1/route")
async def route(request: web.Request) -> web.Response:
    f = await _fields(request)
    ns, keys = f.ns(), validate.key_list(f.keys(), _svc(request).max_keys)
    num_tokens = f.opt_int("num_tokens", lo=0, hi=1 << 40)
    rate = f.opt_int("prefill_tokens_per_s", lo=1)
    r = request.app[FLEET_KEY].route(ns, keys, num_tokens, rate)
    return _reply(
        {"best": r.best, "num_tokens": r.num_tokens, "engines": [vars(e) for e in r.engines]}
    )


def _segments(f: Fields, batch: bool) -> list:
    ranks = f.doc.get("ranks")
    if ranks is not None and not isinstance(ranks, list):
        raise BadRequest("field 'ranks' must be an array")
    counts = f.doc.get("requests") if batch else None
    if batch and not isinstance(counts, list):
        raise BadRequest("field 'requests' must list each request's segment count")
    lengths = f.doc.get("lengths")
    if not isinstance(lengths, list):
        raise BadRequest("field 'lengths' must be an array of segment lengths")
    return decode_segments(f.blob("tokens"), lengths, f.string("kinds"), ranks, counts)


@routes.post("/v1/plan")
async def plan(request: web.Request) -> web.Response:
    f = await _fields(request)
    ns, (segments,) = f.ns(), _segments(f, batch=False)
    return _reply(plan_doc(request.app[PLANNING_KEY].plan(ns, segments)))


@routes.post("/v1/plan/batch")
async def plan_batch(request: web.Request) -> web.Response:
    f = await _fields(request)
    ns, requests = f.ns(), _segments(f, batch=True)
    b = request.app[PLANNING_KEY].plan_batch(ns, requests)
    return _reply({"order": b.order, "groups": b.groups, "plans": [plan_doc(p) for p in b.plans]})


@routes.get("/v1/namespaces")
async def namespaces(request: web.Request) -> web.Response:
    known = _svc(request).namespaces.known()
    return _reply({"namespaces": [{"id": ns.id, **ns.to_dict(), "block_bytes": bb}
                                  for ns, bb in known]})  # fmt: skip
