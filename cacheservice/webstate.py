"""The aiohttp application's state keys and the helpers every handler module shares."""

from __future__ import annotations

from aiohttp import web

from cacheservice.config import ServiceConfig
from cacheservice.fleet import Fleet
from cacheservice.frames_server import FramesInfo
from cacheservice.metrics import Metrics
from cacheservice.planning import Planning
from cacheservice.protocol import CONTENT_TYPE, Fields, pack
from cacheservice.service import CacheService

CONFIG_KEY = web.AppKey("config", ServiceConfig)
SERVICE_KEY = web.AppKey("service", CacheService)
METRICS_KEY = web.AppKey("metrics", Metrics)
FLEET_KEY = web.AppKey("fleet", Fleet)
PLANNING_KEY = web.AppKey("planning", Planning)
FRAMES_KEY = web.AppKey("frames", FramesInfo)


def reply(doc: dict) -> web.Response:
    return web.Response(body=pack(doc), content_type=CONTENT_TYPE)


async def fields(request: web.Request) -> Fields:
    return Fields(await request.read(), request.app[SERVICE_KEY].max_keys)


def service(request: web.Request) -> CacheService:
    return request.app[SERVICE_KEY]
