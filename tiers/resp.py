"""A minimal asyncio RESP2 connection for the Redis tier's bulk path: SET and MGET of large
values without the copies a general client makes.

A write hands the command prefix, the block header, the caller's payload and the trailing CRLF
to ``sendmsg`` as separate buffers, so the only copy of the value is the kernel's. A read
``recv_into``s each large bulk string straight into one fresh buffer sized from its length.
The socket is non-blocking and driven from the event loop itself (no thread hand-off per call):
a syscall never waits, and each wait for the socket is bounded by ``timeout``. After any error
or cancellation the connection's position in the stream is unknown: the caller closes it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from redis.connection import parse_url

from tiers.iovec import advance

T = TypeVar("T")
_READ_BYTES = 64 << 10
_IOV_MAX = 1024  # Linux' limit on buffers per sendmsg


class RespError(Exception):
    """The server answered with an error or with something that is not the expected reply."""


def _bulk_args(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class RespConnection:
    """One socket to the server named by a ``redis://`` or ``unix://`` URL (db, user, password
    honoured); make one with ``await RespConnection.open(...)``. ``timeout`` bounds each wait
    for the socket, so a long value that keeps moving never times out while a stalled server
    does. One command at a time per connection."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(_READ_BYTES)
        self._start = self._end = 0

    @classmethod
    async def open(cls, url: str, timeout: float, connect_timeout: float) -> RespConnection:
        opts = parse_url(url)
        loop = asyncio.get_running_loop()
        sock = None
        try:
            async with asyncio.timeout(connect_timeout):
                if "path" in opts:
                    family, addr = socket.AF_UNIX, opts["path"]
                else:
                    host, port = opts.get("host", "localhost"), opts.get("port", 6379)
                    info = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                    family, addr = info[0][0], info[0][4]
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                await loop.sock_connect(sock, addr)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = cls(sock, timeout)
            hello: list[bytes] = []
            if opts.get("password"):
                user = [opts["username"].encode()] if opts.get("username") else []
                hello.append(_bulk_args(b"AUTH", *user, opts["password"].encode()))
            if opts.get("db"):
                hello.append(_bulk_args(b"SELECT", str(opts["db"]).encode()))
            if hello:
                await conn._send(hello)
                for _ in hello:
                    await conn._expect_ok()
            return conn
        except BaseException:
            if sock is not None:
                sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    # -- commands ---------------------------------------------------------------------------

    async def set_many(self, values: Sequence[tuple[bytes, Sequence[bytes | memoryview]]]) -> None:
        """``SET key value`` for each (key, parts of value), pipelined; each value is one SET,
        so it is stored whole or not at all. Raises unless every SET answered OK."""
        bufs: list[bytes | memoryview] = []
        for key, parts in values:
            size = sum(memoryview(p).nbytes for p in parts)
            bufs.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, size))
            bufs += parts
            bufs.append(b"\r\n")
        await self._send(bufs)
        for _ in values:
            await self._expect_ok()

    async def mget(
        self, keys: Sequence[bytes], then: Callable[[memoryview | None], T] = lambda v: v
    ) -> list[T]:
        """``then`` of the value of each key (None where absent), each value in its own buffer
        owned by the caller. ``then`` runs as each value arrives, while the server sends the
        next: work there (a checksum) overlaps the transfer."""
        await self._send([_bulk_args(b"MGET", *keys)])
        line = await self._line()
        if line != b"*%d" % len(keys):
            raise RespError(f"MGET answered {line[:80]!r}")
        return [then(await self._bulk()) for _ in keys]

    async def get_each(
        self, keys: Sequence[bytes], then: Callable[[memoryview | None], T] = lambda v: v
    ) -> list[T]:
        """Like ``mget`` but one pipelined ``GET`` per key, for a Redis Cluster node, which
        refuses an MGET whose keys hash to different slots. Raises RespError on any error
        reply (MOVED/ASK after a resharding): the caller closes the connection and routes
        the batch again."""
        await self._send([_bulk_args(b"GET", key) for key in keys])
        return [then(await self._bulk()) for _ in keys]

    # -- wire -------------------------------------------------------------------------------

    async def _wait(self, writable: bool) -> None:
        fd, loop = self._sock.fileno(), self._loop
        waiter = loop.create_future()
        (loop.add_writer if writable else loop.add_reader)(fd, _wake, waiter)
        try:
            async with asyncio.timeout(self._timeout):
                await waiter
        finally:
            (loop.remove_writer if writable else loop.remove_reader)(fd)

    async def _recv_into(self, view: memoryview) -> int:
        while True:
            try:
                n = self._sock.recv_into(view)
            except BlockingIOError:
                await self._wait(writable=False)
                continue
            if not n:
                raise ConnectionError("Redis closed the connection")
            return n

    async def _send(self, bufs: Sequence[bytes | memoryview]) -> None:
        views = [memoryview(b).cast("B") for b in bufs]
        i = 0
        while i < len(views):
            try:
                sent = self._sock.sendmsg(views[i : i + _IOV_MAX])
            except BlockingIOError:
                await self._wait(writable=True)
                continue
            i = advance(views, i, sent)

    async def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):  # a line longer than what is left: move it down
            rest = self._end - self._start
            self._buf[:rest] = self._buf[self._start : self._end]
            self._start, self._end = 0, rest
        self._end += await self._recv_into(memoryview(self._buf)[self._end :])

    async def _line(self) -> bytes:
        while (eol := self._buf.find(b"\r\n", self._start, self._end)) < 0:
            if self._end - self._start >= _READ_BYTES:
                raise RespError("reply line too long")
            await self._fill()
        line = bytes(self._buf[self._start : eol])
        self._start = eol + 2
        return line

    async def _expect_ok(self) -> None:
        line = await self._line()
        if line != b"+OK":
            raise RespError(f"Redis answered {line[:200]!r}")

    async def _bulk(self) -> memoryview | None:
        line = await self._line()
        if line[:1] != b"$":
            raise RespError(f"expected a bulk string, got {line[:80]!r}")
        size = int(line[1:])
        if size < 0:
            return None
        want = size + 2  # the value and its CRLF
        out = memoryview(np.empty(want, dtype=np.uint8))
        got = min(want, self._end - self._start)
        out[:got] = memoryview(self._buf)[self._start : self._start + got]
        self._start += got
        while got < want:
            got += await self._recv_into(out[got:])
        if out[size:] != b"\r\n":
            raise RespError("bulk string not terminated by CRLF")
        return out[:size]
