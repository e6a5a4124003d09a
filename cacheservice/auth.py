"""Bearer-token auth for the control plane. ``/health`` stays open so probes need no secret.
Where the token comes from by default: ``tokens.py``."""

from __future__ import annotations

import hmac

from aiohttp import web

from cacheservice.errors import Unauthorized

OPEN_PATHS = frozenset({"/health"})


def bearer_ok(header: str | None, token: str) -> bool:
    """Constant-time check of an ``Authorization`` header against the configured token."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode())


def auth_middleware(token: str):
    """Middleware that rejects requests without ``Authorization: Bearer <token>``. Installed
    only when a token is configured, so an open service pays nothing per request."""

    @web.middleware
    async def check_token(request: web.Request, handler):
        if request.path not in OPEN_PATHS and not bearer_ok(
            request.headers.get("Authorization"), token
        ):
            raise Unauthorized(
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                "(CacheClient(token=...)) with the token the service was started with"
            )
        return await handler(request)

    return check_token
