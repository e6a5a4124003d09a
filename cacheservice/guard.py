"""Request-origin checks: what a web page in a browser on this host must not be able to do.

A browser lets any page POST to 127.0.0.1 (a cross-site "simple" request with a text/plain
body) and, through DNS rebinding, read the answers under a name the attacker controls. So the
service answers only requests that (1) carry no ``Origin`` header (browsers always send one
on cross-site and rebinding requests; engines and clients never do), (2) name an allowed
``Host``: an IP literal, ``localhost``, or a name in ``allowed_hosts`` ("*" allows any), and
(3) for POST, declare a msgpack (or octet-stream) Content-Type, which a page cannot send
without a CORS preflight that this service never approves (text/plain, forms and a missing
type are what a page can send freely).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from aiohttp import web

from cacheservice.errors import Forbidden, UnsupportedMediaType
from cacheservice.protocol import CONTENT_TYPE

OPEN_PATHS = frozenset({"/health"})
BODY_TYPES = frozenset({CONTENT_TYPE, "application/x-msgpack", "application/octet-stream"})


def host_name(host_header: str) -> str:
    """``name`` from ``name``, ``name:port``, ``[v6]`` or ``[v6]:port``."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    if host_header.count(":") == 1:
        return host_header.rsplit(":", 1)[0]
    return host_header


def host_allowed(host_header: str | None, allowed: frozenset[str]) -> bool:
    if not host_header:
        return True  # HTTP/1.0 without Host: no browser sends that
    if "*" in allowed:
        return True
    name = host_name(host_header).rstrip(".").lower()
    if name == "localhost" or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def guard_middleware(allowed_hosts: Iterable[str]):
    allowed = frozenset(h.strip().lower() for h in allowed_hosts if h.strip())

    @web.middleware
    async def guard(request: web.Request, handler):
        if request.path not in OPEN_PATHS:
            if request.headers.get("Origin") is not None:
                raise Forbidden(
                    "requests from web pages (with an Origin header) are refused; engines and "
                    "CacheClient send none"
                )
            if not host_allowed(request.headers.get("Host"), allowed):
                raise Forbidden(
                    f"Host {request.headers.get('Host')!r} is not allowed: connect by IP or "
                    "localhost, or add the name to the service's --allowed-hosts"
                )
            if request.method == "POST" and request.content_type not in BODY_TYPES:
                raise UnsupportedMediaType(
                    f"Content-Type must be {CONTENT_TYPE}, got {request.content_type!r}"
                )
        return await handler(request)

    return guard
