"""The same-host frames socket against a real service process: clients switch to it and get
the answers HTTP gives; hostile frames (no hello, wrong token, oversized or truncated
bodies, unknown operations, garbage) get an error or a closed connection and change
nothing; the socket is private, goes with the service, and a restart or another service's
socket never sends a call to the wrong instance."""

from __future__ import annotations

import json
import os
import socket
import stat
import time

import msgpack
import pytest

from cacheservice.client import CacheClient
from cacheservice.errors import Unauthorized
from cacheservice.frames import ANSWER, OP_IDS, REQUEST, FramesLane
from cacheservice.tokens import client_token
from tests.factories import BLOCK_BYTES, make_namespace, make_payloads, make_prefix_keys


def frames_path(svc) -> str:
    return f"{svc.arena_path}.sock"


def raw(svc) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(frames_path(svc))
    return s


def send(s: socket.socket, op: int, body: bytes, length: int | None = None) -> None:
    s.sendall(REQUEST.pack(len(body) if length is None else length, op) + body)


def answer(s: socket.socket) -> tuple[int, dict | None]:
    """(status, document), or (0, None) when the service closed the connection."""
    head = s.recv(ANSWER.size, socket.MSG_WAITALL)
    if len(head) < ANSWER.size:
        return 0, None
    length, status = ANSWER.unpack(head)
    return status, msgpack.unpackb(s.recv(length, socket.MSG_WAITALL)) if length else {}


def hello(s: socket.socket, token: str | None) -> tuple[int, dict | None]:
    send(s, 0, msgpack.packb({"token": client_token(token) or ""}))
    return answer(s)


def test_clients_switch_to_frames_and_get_what_http_gives(service) -> None:
    ns = make_namespace()
    keys, blocks = make_prefix_keys(ns, 6, seed=31), make_payloads(6, seed=31)
    with service.client() as fast, service.client(frames=False) as http:
        assert fast.register(ns, BLOCK_BYTES).ns == ns.id
        assert fast.transport == "frames" and http.transport == "http"
        assert fast.put_blocks(ns.id, keys[:4], b"".join(blocks[:4])) == 4
        for c in (fast, http):
            assert c.lookup(ns.id, keys).hits == 4
            assert c.get_blocks(ns.id, keys).data == b"".join(blocks[:4])
        lease = fast.acquire(ns.id, keys)
        assert len(lease.slots) == 4 and http.release(lease.lease) == 4
        with pytest.raises(Unauthorized):
            CacheClient(service.url, token="wrong").lookup(ns.id, keys)
    st = os.stat(frames_path(service))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_hostile_frames_get_errors_and_change_nothing(service) -> None:
    ns = make_namespace()
    keys, blocks = make_prefix_keys(ns, 4, seed=32), make_payloads(4, seed=32)
    with service.client() as c:
        c.register(ns, BLOCK_BYTES)
        c.put_blocks(ns.id, keys, b"".join(blocks))
        before = c.stats()["stores"]
    lookup = OP_IDS["/v1/lookup"]
    body = msgpack.packb({"ns": ns.id, "keys": b"".join(keys)})
    with raw(service) as s:  # no hello: refused, closed
        send(s, lookup, body)
        assert answer(s)[0] == 401 and answer(s) == (0, None)
    with raw(service) as s:  # wrong token
        assert hello(s, "not-the-token")[0] == 401 and answer(s) == (0, None)
    with raw(service) as s:
        status, doc = hello(s, service.token)
        assert status == 200 and doc["instance"]
        send(s, 200, b"")  # unknown operation: 404, the connection stays usable
        assert answer(s)[0] == 404
        send(s, lookup, b"\xc1garbage")
        assert answer(s)[0] == 400
        send(s, OP_IDS["/v1/blocks/put"], msgpack.packb({"ns": ns.id, "keys": keys[0] * 2}))
        assert answer(s)[0] == 400  # repeated key, validated as over HTTP
        send(s, lookup, body)
        status, doc = answer(s)
        assert status == 200 and doc["hits"] == 4
        send(s, lookup, b"", length=1 << 31)  # a length over max_body_bytes: 413, closed
        assert answer(s)[0] == 413 and answer(s) == (0, None)
    with raw(service) as s:  # a truncated frame, then gone: nothing runs
        hello(s, service.token)
        send(s, OP_IDS["/v1/blocks/put"], b"\x81", length=1000)
    with service.client() as c:
        assert c.lookup(ns.id, keys).hits == 4
        assert c.stats()["stores"] == before


def test_frames_are_answered_in_order_when_pipelined(service) -> None:
    ns = make_namespace()
    keys = make_prefix_keys(ns, 8, seed=33)
    with service.client() as c:
        c.register(ns, BLOCK_BYTES)
        c.put_blocks(ns.id, keys[:5], b"".join(make_payloads(5, seed=33)))
    with raw(service) as s:
        hello(s, service.token)
        for n in range(1, 9):  # eight requests before reading any answer
            send(s, OP_IDS["/v1/lookup"], msgpack.packb({"ns": ns.id, "keys": b"".join(keys[:n])}))
        assert [answer(s)[1]["hits"] for _ in range(8)] == [1, 2, 3, 4, 5, 5, 5, 5]


def test_a_restarted_service_is_found_again(make_service) -> None:
    svc = make_service()
    ns = make_namespace()
    keys = make_prefix_keys(ns, 3, seed=34)
    with svc.client() as c:
        c.register(ns, BLOCK_BYTES)
        assert c.transport == "frames"
        first = c._lane.instance
        c.put_blocks(ns.id, keys, b"".join(make_payloads(3, seed=34)))
        svc.restart()
        deadline = time.monotonic() + 10
        while c.lookup(ns.id, keys).hits != 3 or c.transport != "frames":
            assert time.monotonic() < deadline, "the client never found the new instance"
            time.sleep(0.1)
        assert c._lane.instance != first
    assert svc.stop() == 0
    assert not os.path.exists(frames_path(svc)), "the frames socket outlived the service"


def test_another_services_socket_is_never_used(make_service) -> None:
    """A client of A that is told (by a stale or lying /health) about B's socket must not
    send A's calls to B: the hello names B's instance, so the lane stays on HTTP."""
    a, b = make_service("a"), make_service("b")
    with CacheClient(b.url, frames=False) as cb:
        doc = json.loads(cb._send("GET", "/health", None)[1])
    lying = {"status": "ok", "frames": doc["frames"], "instance": "a-instance"}
    answer_lie = lambda path: (200, json.dumps(lying).encode())  # noqa: E731
    lane = FramesLane("127.0.0.1", client_token(a.token), (2.0, 1.0), answer_lie)
    assert lane.call("/v1/lookup", b"") is None and lane.path is None
    assert not FramesLane("10.1.2.3", None, (1.0, 1.0), lambda p: (200, b"{}")).enabled


def test_without_a_frames_socket_everything_is_http(make_service) -> None:
    svc = make_service(extra=["--frames-socket", "none"])
    ns = make_namespace()
    with svc.client() as c:
        assert c.register(ns, BLOCK_BYTES).ns == ns.id
        assert c.transport == "http"
    assert not os.path.exists(frames_path(svc))


def test_a_stopped_service_times_out_once_not_twice(make_service) -> None:
    """SIGSTOP: the frames call times out and raises; it does not retry over HTTP (which
    would double what the engine waits)."""
    import signal

    from cacheservice.errors import ServiceUnavailable

    svc = make_service()
    ns = make_namespace()
    with svc.client(timeout=0.3) as c:
        c.register(ns, BLOCK_BYTES)
        svc.proc.send_signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                c.lookup(ns.id, make_prefix_keys(ns, 2))
            assert time.monotonic() - start < 0.55
        finally:
            svc.proc.send_signal(signal.SIGCONT)
        assert c.lookup(ns.id, make_prefix_keys(ns, 2)).hits == 0
    svc.proc.send_signal(signal.SIGSTOP)
    try:  # a fresh client: finding the socket must not add a wait of its own either
        with svc.client(timeout=0.3, connect_timeout=0.3) as fresh:
            start = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                fresh.lookup(ns.id, make_prefix_keys(ns, 2))
            assert time.monotonic() - start < 0.55
    finally:
        svc.proc.send_signal(signal.SIGCONT)


def test_a_service_without_a_socket_is_asked_ever_more_rarely() -> None:
    """A service with frames off is not asked /health once a second per client forever: each
    answer without a socket doubles the wait before the next question, up to a cap."""
    asked: list[float] = []

    def health(path: str) -> tuple[int, bytes]:
        asked.append(time.monotonic())
        return 200, json.dumps({"status": "ok"}).encode()

    lane = FramesLane("127.0.0.1", None, (1.0, 1.0), health, retry_s=0.05)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert lane.call("/v1/lookup", b"") is None
        time.sleep(0.005)
    gaps = [b - a for a, b in zip(asked, asked[1:], strict=False)]
    assert 3 <= len(asked) <= 6, f"asked {len(asked)} times in 1 s at retry_s=0.05"
    assert all(later > 1.5 * earlier for earlier, later in zip(gaps, gaps[1:], strict=False))
