"""The frames socket (frames.py has the wire format): the data-plane operations of ops.py
over a same-host unix socket, beside the HTTP listeners, on the same service state.

Bounds, as for HTTP: a body over ``max_body_bytes`` is answered 413 and the connection
closed (its length cannot be trusted to resynchronise); at most ``max_connections`` at
once (more are closed at accept); a connection that has not said hello with the right
token gets 401 and is closed. A slow or stalled client holds only its own connection.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass

from cacheservice import ops
from cacheservice.errors import CacheServiceError
from cacheservice.frames import ANSWER, HELLO, OPS, REQUEST
from cacheservice.metrics import Metrics
from cacheservice.protocol import Fields, error_body, pack, unpack_request
from cacheservice.service import CacheService

log = logging.getLogger("cacheservice.frames")

_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclass(frozen=True)
class FramesInfo:
    """What /health advertises: where the socket is and which service instance owns it."""

    path: str
    instance: str


class FramesServer:
    def __init__(
        self,
        service: CacheService,
        metrics: Metrics,
        path: str,
        token: str | None,
        max_body_bytes: int,
        max_connections: int = 256,
    ):
        self.service, self.metrics, self.path = service, metrics, path
        self.token, self.max_body_bytes = token, max_body_bytes
        self.max_connections = max_connections
        self.info = FramesInfo(path, secrets.token_hex(8))
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self) -> None:
        if len(os.fsencode(self.path)) > _PATH_MAX:
            raise OSError(f"frames socket path longer than {_PATH_MAX} bytes: {self.path}")
        _remove_stale(self.path)
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            self._server = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None, "a connection handler runs in a task"
        if len(self._conns) >= self.max_connections:
            writer.close()
            return
        self._conns.add(task)
        try:
            await self._frames(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away mid-frame: nothing of its request was run
        finally:
            self._conns.discard(task)
            writer.close()

    async def _frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        authed = False
        while True:
            length, op = REQUEST.unpack(await reader.readexactly(REQUEST.size))
            if length > self.max_body_bytes:
                msg = f"frame body of {length} bytes exceeds max_body_bytes={self.max_body_bytes}"
                await _answer(writer, 413, error_body("too_large", msg))
                return
            body = await reader.readexactly(length)
            if op == HELLO:
                authed = self._hello(body)
                if not authed:
                    msg = "wrong token in hello: send the token the service was started with"
                    await _answer(writer, 401, error_body("unauthorized", msg))
                    return
                hello = {"instance": self.info.instance, "max_body_bytes": self.max_body_bytes}
                await _answer(writer, 200, pack(hello))
                continue
            if not authed:
                msg = "the first frame must be hello with the service's token"
                await _answer(writer, 401, error_body("unauthorized", msg))
                return
            await _answer(writer, *await self._run(op, body))

    def _hello(self, body: bytes) -> bool:
        try:
            doc = unpack_request(body, 1)
            given = doc.get("token", "") if isinstance(doc, dict) else ""
        except CacheServiceError:
            return False
        if not isinstance(given, str):
            return False
        return self.token is None or hmac.compare_digest(given.encode(), self.token.encode())

    async def _run(self, op: int, body: bytes) -> tuple[int, bytes]:
        path = OPS[op] if 0 < op < len(OPS) else None
        func = ops.DATA_PLANE.get(path) if path is not None else None
        if func is None:
            return 404, error_body("not_found", f"no frames operation {op}: see frames.OPS")
        start, status = time.perf_counter(), 500
        try:
            doc = await func(self.service, Fields(body, self.service.max_keys))
            status = 200
            return status, pack(doc)
        except CacheServiceError as e:
            status = e.status
            return status, error_body(e.code, str(e))
        except Exception as e:
            log.exception("frames handler bug on %s", path)
            msg = f"internal error ({type(e).__name__}: {e}); the service is still up"
            return status, error_body("internal", msg)
        finally:
            self.metrics.observe(path, status, time.perf_counter() - start)


async def _answer(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    writer.write(ANSWER.pack(len(body), status))
    writer.write(body)
    await writer.drain()


def _remove_stale(path: str) -> None:
    """Unlink a socket file a crashed service left; refuse if a live one answers on it."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(f"frames socket {path} is in use by a running service")
    finally:
        probe.close()
