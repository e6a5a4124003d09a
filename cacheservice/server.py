"""The aiohttp application: the data-plane operations (ops.py) as msgpack endpoints, plus
stats, health and metrics (PROTOCOL.md). The same-host frames socket serves the same
operations (frames_server.py). Middleware, outermost first: request metrics, error mapping
(typed errors -> their status, anything else -> 500 with a message; the service stays up),
origin checks (guard.py: no browser pages, allowed Host names, msgpack bodies), then bearer
auth unless the service was opened deliberately with ``auth = "none"`` (tokens.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from cacheservice import ops, tokens
from cacheservice.auth import auth_middleware
from cacheservice.config import ServiceConfig
from cacheservice.errors import CacheServiceError
from cacheservice.fleet import Fleet
from cacheservice.fleet_routes import routes as fleet_routes
from cacheservice.frames_server import FramesServer
from cacheservice.guard import guard_middleware
from cacheservice.memory import tune_allocator
from cacheservice.metrics import CONTENT_TYPE as METRICS_TYPE
from cacheservice.metrics import Metrics
from cacheservice.planning import Planning
from cacheservice.protocol import CONTENT_TYPE, error_body
from cacheservice.service import CacheService
from cacheservice.webstate import (
    CONFIG_KEY,
    FLEET_KEY,
    FRAMES_KEY,
    METRICS_KEY,
    PLANNING_KEY,
    SERVICE_KEY,
)
from cacheservice.webstate import (
    fields as _fields,
)
from cacheservice.webstate import (
    reply as _reply,
)
from cacheservice.webstate import (
    service as _svc,
)
from tiers.base import Tier
from tiers.disk import DiskTier
from tiers.host import HostTier

log = logging.getLogger("cacheservice.server")

routes = web.RouteTableDef()
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(status=status, body=error_body(code, message), content_type=CONTENT_TYPE)


def _http(op: ops.Op):
    async def handler(request: web.Request) -> web.Response:
        return _reply(await op(_svc(request), await _fields(request)))

    return handler


for _path, _op in ops.DATA_PLANE.items():
    routes.post(_path)(_http(_op))


@routes.get("/v1/stats")
async def stats(request: web.Request) -> web.Response:
    return _reply(_svc(request).stats())


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    doc = {"status": "ok"}
    if FRAMES_KEY in request.app:  # same-host clients switch to it (frames.py)
        info = request.app[FRAMES_KEY]
        doc |= {"frames": info.path, "instance": info.instance}
    return web.Response(text=json.dumps(doc), content_type="application/json")


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS_KEY].render(), headers={"Content-Type": METRICS_TYPE}
    )


def _endpoint(request: web.Request) -> str:
    # Route templates, not raw paths, so a scanner cannot blow up label cardinality.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        request.app[METRICS_KEY].observe(_endpoint(request), status, time.perf_counter() - start)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except CacheServiceError as e:
        return _error(e.status, e.code, str(e))
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG_KEY].max_body_bytes
        return _error(
            413,
            "too_large",
            f"request body of {request.content_length} bytes exceeds max_body_bytes={limit}: "
            "send fewer blocks per call or raise the service's --max-body-bytes",
        )
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "bad_request")
        return _error(e.status, code, f"{e.reason}: {request.method} {request.path}")
    except Exception as e:
        log.exception("handler bug on %s %s", request.method, request.path)
        return _error(
            500, "internal", f"internal error ({type(e).__name__}: {e}); the service is still up"
        )


def build_tiers(cfg: ServiceConfig) -> tuple[HostTier, list[Tier]]:
    """The tier stack a config describes, fastest first: host arena, disk, Redis. A tier that
    cannot be built leaves nothing behind (the arena file is removed again)."""
    host = HostTier(cfg.arena_path, cfg.arena_bytes, cfg.slot_bytes)
    try:
        lower: list[Tier] = []
        if cfg.disk_dir is not None:
            lower.append(DiskTier(cfg.disk_dir, cfg.disk_bytes))
        if cfg.redis_url is not None:
            # imports redis-py only when a Redis tier is set
            if cfg.redis_mode == "cluster":
                from tiers.redis_cluster import RedisClusterTier as RedisTier
            elif cfg.redis_mode == "sentinel":
                from tiers.redis_sentinel import RedisSentinelTier as RedisTier
            else:
                from tiers.redis import RedisTier
            lower.append(RedisTier(cfg.redis_url, cfg.redis_bytes))
    except BaseException:
        host.shutdown()
        raise
    return host, lower


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG_KEY]
    host, lower = build_tiers(cfg)
    service = CacheService(
        host,
        lower,
        lease_ms=cfg.lease_ms,
        max_keys=cfg.max_keys,
        max_response_bytes=cfg.max_body_bytes,
        remote_lookup_ms=cfg.remote_lookup_ms,
    )
    try:
        await service.start()
    except BaseException:
        await service.close()
        raise
    app[SERVICE_KEY] = service
    service.stack.read_rates.probe_memcpy(service.host.name)
    app[FLEET_KEY] = Fleet(
        service.tree,
        service.namespaces,
        service.stack.read_rates,
        max_engines=cfg.max_engines,
        prefill_tokens_per_s=cfg.prefill_tokens_per_s,
    )
    app[PLANNING_KEY] = Planning(service.tree, service.chunks, service.namespaces)
    publisher = None
    try:
        if cfg.events_endpoint is not None:
            from cacheservice.event_publisher import TierEventPublisher  # pyzmq: events extra

            publisher = TierEventPublisher(
                cfg.events_endpoint, cfg.events_replay_endpoint, cfg.events_topic
            )
            publisher.start()
            service.tree.on_tier = publisher.on_tier
        yield
    finally:
        service.tree.on_tier = None
        await app[FLEET_KEY].close()
        if publisher is not None:
            await publisher.close()
        await service.close()


def _frames_ctx(token: str | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        cfg = app[CONFIG_KEY]
        server = None
        if cfg.frames_socket is not None:
            server = FramesServer(
                app[SERVICE_KEY], app[METRICS_KEY], cfg.frames_socket, token, cfg.max_body_bytes
            )
            try:
                await server.start()
            except OSError as e:  # HTTP still serves everything: a warning, not a failed start
                log.warning("no frames socket (%s): same-host clients use HTTP", e)
                server = None
            else:
                app[FRAMES_KEY] = server.info
        try:
            yield
        finally:
            if server is not None:
                await server.close()

    return ctx


def service_token(config: ServiceConfig) -> str | None:
    """The token requests must carry: the configured one, else (auth "token", the default)
    the same-user token file, created at first start; None only for auth "none"."""
    if config.token:
        return config.token
    if config.auth == "none":
        return None
    return tokens.load_or_create(config.token_file)


def create_app(config: ServiceConfig) -> web.Application:
    tune_allocator()  # before any block-sized buffer exists
    middlewares = [
        metrics_middleware,
        error_middleware,
        guard_middleware(config.allowed_hosts.split(",")),
    ]
    token = service_token(config)
    if token:
        middlewares.append(auth_middleware(token))
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = Metrics(lambda: app[SERVICE_KEY].stats() if SERVICE_KEY in app else None)
    app.cleanup_ctx.append(_service_ctx)
    app.cleanup_ctx.append(_frames_ctx(token))
    app.add_routes(routes)
    app.add_routes(fleet_routes)
    return app
