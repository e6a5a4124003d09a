"""Frames: the lean same-host transport for the data plane (PROTOCOL.md "Frames").

An HTTP round trip through aiohttp and http.client costs ~1 ms of Python on a busy host; an
engine's scheduler pays one per lookup and its worker one per acquire. A frame carries the
same msgpack document over a unix socket with a 5-byte header:

    request: u32 body length (little-endian), u8 operation (index in OPS), body
    answer:  u32 body length, u16 status (the HTTP endpoint's), body (its answer or error)

The first frame on a connection is ``hello`` with ``{"token": ...}`` (the bearer token, or
"" when the service runs without auth); it answers ``{"instance": id}``, the id ``/health``
also names, so a client proves the socket belongs to the service its URL points at, and its
``max_body_bytes``, so a client refuses an oversize body before sending a byte of it. Frames
are answered in order, one at a time per connection. The socket is 0600: same user only.

A service that rejects a frame (413, 401) answers, then closes the connection without reading
the rest: a client still sending gets EPIPE, yet the answer is already in its receive buffer,
so it reads that answer instead of reporting the service unreachable.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable

from cacheservice.errors import ServiceUnavailable, TooLarge
from cacheservice.protocol import error_for, pack, unpack

# Operation numbers are positions: append only (ops.DATA_PLANE holds the same paths).
OPS = (
    "hello",
    "/v1/namespace",
    "/v1/lookup",
    "/v1/acquire",
    "/v1/release",
    "/v1/reserve",
    "/v1/commit",
    "/v1/exists",
    "/v1/blocks/put",
    "/v1/blocks/get",
    "/v1/chunks/register",
    "/v1/chunks/lookup",
)
OP_IDS = {name: i for i, name in enumerate(OPS)}
HELLO = 0
REQUEST = struct.Struct("<IB")
ANSWER = struct.Struct("<IH")


class FramesConnection:
    """One client connection (not thread-safe: the client keeps one per thread)."""

    def __init__(self, path: str, token: str | None, timeout: float, connect_timeout: float):
        self.path, self.token = path, token or ""
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.sock: socket.socket | None = None
        self.instance = ""
        self.max_body_bytes: int | None = None  # the service's bound, from its hello

    def connect(self) -> str:
        """Open and say hello; returns the service instance id. OSError if unreachable."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.path)
            sock.settimeout(self.timeout)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        status, data = self._exchange(HELLO, pack({"token": self.token}))
        if status != 200:
            self.close()
            raise error_for(status, data)
        doc = unpack(data)
        self.instance = str(doc.get("instance", ""))
        bound = doc.get("max_body_bytes")
        self.max_body_bytes = bound if isinstance(bound, int) and bound > 0 else None
        return self.instance

    def call(self, path: str, body: bytes) -> tuple[int, bytes]:
        """Send one operation, return (status, answer body). OSError when the socket fails;
        TooLarge, without sending, for a body over the service's ``max_body_bytes``."""
        if self.sock is None:
            self.connect()
        if self.max_body_bytes is not None and len(body) > self.max_body_bytes:
            raise TooLarge(
                f"{path} body of {len(body)} bytes exceeds the service's "
                f"max_body_bytes={self.max_body_bytes}: send fewer blocks per call or raise the "
                "service's --max-body-bytes"
            )
        return self._exchange(OP_IDS[path], body)

    def _exchange(self, op: int, body: bytes) -> tuple[int, bytes]:
        sock = self.sock
        assert sock is not None, "exchange on a closed frames connection"
        try:
            _send_frame(sock, REQUEST.pack(len(body), op), body)
        except (BrokenPipeError, ConnectionResetError):
            # The service may have answered (413, 401) and closed before reading it all.
            answer = _buffered_answer(sock)
            self.close()
            if answer is None:
                raise
            return answer
        return _read_answer(sock)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_FALLBACK = (FileNotFoundError, ConnectionRefusedError, PermissionError)
NO_SOCKET_MAX_S = 60.0  # a service restarted with frames on is found within a minute


class FramesLane:
    """A client's switch to frames: on a same-host URL it asks ``/health`` (through
    ``http_get``) where the frames socket is, and uses it once the socket's hello names the
    same service instance. ``call`` returns None when a call should go over HTTP: no
    socket advertised, unreachable, or another instance. A socket that refuses connections
    is asked about again after ``retry_s``; a timeout raises (falling back would double it)."""

    def __init__(
        self,
        host: str | None,
        token: str | None,
        timeouts: tuple[float, float],
        http_get: Callable[[str], tuple[int, bytes]],
        retry_s: float = 1.0,
    ):
        self.enabled = host is None or host in _LOCAL_HOSTS or host.startswith("127.")
        self.token, self.timeouts, self.http_get = token, timeouts, http_get
        self.retry_s = retry_s
        # A service that advertises no socket (frames off) is asked again ever more rarely:
        # not one /health call a second per client forever.
        self._no_socket_s = retry_s
        self.path: str | None = None
        self.instance = ""
        self._next_try = 0.0
        self._local = threading.local()
        self._all: list[FramesConnection] = []
        self._lock = threading.Lock()

    def call(self, path: str, body: bytes) -> tuple[int, bytes] | None:
        if not self.enabled or path not in OP_IDS:
            return None
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            reused = conn is not None
            if conn is None and (conn := self._open()) is None:
                return None
            try:
                return conn.call(path, body)
            except TimeoutError as e:
                self._drop(conn)
                raise ServiceUnavailable(f"cacheservice frames call {path} timed out: {e}") from e
            except OSError as e:
                self._drop(conn)
                if not (reused and attempt == 0):
                    raise unreachable(conn.path, e) from e
                # an idle connection the service closed (restart): once more, fresh
        raise AssertionError("unreachable: the loop returns or raises")

    def _open(self) -> FramesConnection | None:
        if self.path is None and not self._discover():
            return None
        conn = FramesConnection(self.path or "", self.token, *self.timeouts)
        try:
            instance = conn.connect()
        except _FALLBACK:
            self.path, self._next_try = None, time.monotonic() + self.retry_s
            return None
        except TimeoutError as e:  # a stopped service: HTTP would time out once more
            raise ServiceUnavailable(f"cacheservice frames hello timed out: {e}") from e
        except OSError:
            return None
        if instance != self.instance:
            conn.close()  # another service owns that path now: ask /health again later
            self.path, self._next_try = None, time.monotonic() + self.retry_s
            return None
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def _discover(self) -> bool:
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + self.retry_s
        # ServiceUnavailable goes to the caller: its HTTP call would fail (or wait) the same way
        status, data = self.http_get("/health")
        try:
            doc = json.loads(data) if status == 200 else {}
        except ValueError:
            return False
        path, instance = doc.get("frames"), doc.get("instance")
        if not isinstance(path, str) or not isinstance(instance, str):
            if status == 200:
                self._next_try = now + self._no_socket_s
                self._no_socket_s = min(2 * self._no_socket_s, NO_SOCKET_MAX_S)
            return False
        self.path, self.instance = path, instance
        self._no_socket_s = self.retry_s
        return True

    def _drop(self, conn: FramesConnection) -> None:
        conn.close()
        self._local.conn = None
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()


def _send_frame(sock: socket.socket, head: bytes, body: bytes) -> None:
    if len(body) < 65536:
        sock.sendall(head + body)
        return
    sent = sock.sendmsg([head, body])  # no concatenated copy of a large payload
    if sent < len(head):
        sock.sendall(head[sent:])
        sent = len(head)
    sock.sendall(memoryview(body)[sent - len(head) :])


def _read_answer(sock: socket.socket) -> tuple[int, bytes]:
    length, status = ANSWER.unpack(_recv_exact(sock, ANSWER.size))
    return status, _recv_exact(sock, length)


def _buffered_answer(sock: socket.socket) -> tuple[int, bytes] | None:
    """The answer a service wrote before closing on us, if a whole one is there."""
    try:
        sock.settimeout(0.05)  # it was written before the close we saw: no waiting for more
        return _read_answer(sock)
    except OSError:
        return None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionResetError("cacheservice closed the frames connection")
        got += k
    return bytes(buf)


def unreachable(path: str, e: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"cannot reach cacheservice frames socket {path}: {e!r}")
