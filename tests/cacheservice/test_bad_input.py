"""Bad requests get the right 4xx with a helpful message, change nothing, and leave the
service up with every block stored before them still retrievable."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import msgpack
import pytest

from cacheservice.calls import headers as client_headers
from cacheservice.client import CacheClient
from cacheservice.errors import (
    BadRequest,
    NamespaceConflict,
    TooLarge,
    Unauthorized,
    UnknownNamespace,
    WrongBlockSize,
)
from cacheservice.frames import FramesConnection
from cacheservice.tokens import client_token
from tests.factories import BLOCK_BYTES, make_namespace, make_payloads, make_prefix_keys
from tests.processes import ServiceProcess


def raw_post(svc: ServiceProcess, path: str, body: bytes, headers: dict | None = None) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=client_headers(svc.token) | (headers or {}))
        resp = conn.getresponse()
        return resp.status, msgpack.unpackb(resp.read(), raw=False)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def stored(service: ServiceProcess) -> Iterator[tuple[str, list[bytes], list[bytes]]]:
    """A namespace with 4 stored blocks that every bad request below must leave intact."""
    ns = make_namespace()
    keys, blocks = make_prefix_keys(ns, 4, seed=7), make_payloads(4, seed=7)
    with service.client() as c:
        info = c.register(ns, BLOCK_BYTES)
        assert c.put_blocks(info.ns, keys, b"".join(blocks)) == 4
        yield info.ns, keys, blocks
        # The service survived everything and lost nothing.
        assert c.health()
        got = c.get_blocks(info.ns, keys)
        assert got.count == 4 and got.data == b"".join(blocks)


def pk(doc: object) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/lookup", b"\xc1\xff garbage", 400, "not valid msgpack"),
        ("/v1/lookup", pk([1, 2, 3]), 400, "must be a msgpack map"),
        ("/v1/lookup", pk({"keys": bytes(16)}), 400, "missing field 'ns'"),
        ("/v1/lookup", pk({"ns": 7, "keys": bytes(16)}), 400, "'ns' must be a string"),
        ("/v1/lookup", pk({"ns": "short", "keys": bytes(16)}), 400, "16-hex-digit"),
        ("/v1/lookup", pk({"ns": "0" * 16, "keys": "text"}), 400, "must be binary"),
        ("/v1/lookup", pk({"ns": "0" * 16, "keys": bytes(17)}), 400, "not a multiple of 16"),
        ("/v1/acquire", pk({"ns": "0" * 16, "keys": b"", "lease_ms": -5}), 400, ">= 1"),
        ("/v1/acquire", pk({"ns": "0" * 16, "keys": b"", "lease_ms": True}), 400, "integer"),
        ("/v1/acquire", pk({"ns": "0" * 16, "keys": b"", "flat": 1}), 400, "boolean"),
        ("/v1/reserve", pk({"ns": "0" * 16, "keys": b"", "parent": bytes(3)}), 400, "16-byte"),
        ("/v1/commit", pk({"lease": "x", "ok": [1, 0]}), 400, "only booleans"),
        ("/v1/namespace", pk({"namespace": {"model": "m"}, "block_bytes": 64}), 400, "dtype"),
        (
            "/v1/namespace",
            pk({"namespace": {"model": "m", "dtype": "f", "layout": "l", "block_tokens": 0}}),
            400,
            "block_tokens must be positive",
        ),
        (
            "/v1/namespace",
            pk({"namespace": {"model": 1, "dtype": "f", "layout": "l", "block_tokens": 16}}),
            400,
            "namespace.model",
        ),
        ("/v1/chunks/lookup", pk({"ns": "0" * 16, "chunks": [b"x"]}), 400, "chunks[0]"),
        ("/v1/lookup", pk({"ns": "0" * 16, "keys": b"\x01" * 16}), 404, "unknown_namespace"),
        ("/v1/no/such/route", pk({}), 404, "not_found"),
    ],
)
def test_bad_request_status(stored, service, path, body, status, needle) -> None:
    got_status, doc = raw_post(service, path, body)
    assert got_status == status, doc
    assert needle in doc["message"] or needle == doc["error"], doc
    assert set(doc) == {"error", "message"}


def test_wrong_method_is_405_in_msgpack(stored, service: ServiceProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.request("GET", "/v1/lookup", headers=client_headers(service.token))
    resp = conn.getresponse()
    assert resp.status == 405
    assert msgpack.unpackb(resp.read(), raw=False)["error"] == "method_not_allowed"
    conn.close()


def test_typed_errors_through_client(stored, client: CacheClient) -> None:
    ns, keys, blocks = stored
    with pytest.raises(BadRequest, match="16 bytes"):  # caught before anything is sent
        client.lookup(ns, [bytes(20)])
    with pytest.raises(UnknownNamespace):
        client.lookup("f" * 16, keys)
    with pytest.raises(WrongBlockSize):
        client.put_blocks(ns, keys[:2], b"x" * (BLOCK_BYTES + 1))
    ns_obj = make_namespace()
    client.register(ns_obj, BLOCK_BYTES)
    with pytest.raises(NamespaceConflict):
        client.register(ns_obj, BLOCK_BYTES * 2)
    with pytest.raises(TooLarge, match="slot"):
        client.register(make_namespace(), 1 << 20)


def test_too_many_keys_is_413(stored, service: ServiceProcess) -> None:
    ns = stored[0]
    status, doc = raw_post(service, "/v1/lookup", pk({"ns": ns, "keys": bytes(16 * 70000)}))
    assert status == 413 and doc["error"] == "too_large"
    assert "max_keys" in doc["message"]


def test_oversize_body_is_413_and_service_stays_up(make_service) -> None:
    svc = make_service("small", extra=["--max-body-bytes", "64k"])
    with svc.client() as c:
        ns = make_namespace()
        info = c.register(ns, BLOCK_BYTES)
        keys, blocks = make_prefix_keys(ns, 100), make_payloads(100)
        with pytest.raises(TooLarge, match="max_body_bytes"):
            c.put_blocks(info.ns, keys, b"".join(blocks))
        assert c.lookup(info.ns, keys).hits == 0  # nothing of the rejected call was stored
        assert c.put_blocks(info.ns, keys[:10], b"".join(blocks[:10])) == 10
        assert c.lookup(info.ns, keys).hits == 10


def test_oversize_body_is_413_on_every_transport_however_far_it_got(make_service) -> None:
    """A body far over the bound is a TooLarge, never 'unreachable': refused before sending
    when the client knows the bound (frames hello), read from the receive buffer when the
    service answered and closed while the body was still going out (HTTP, or a frames
    client that did not know the bound)."""
    svc = make_service("small", extra=["--max-body-bytes", "64k"])
    ns = make_namespace()
    keys, blocks = make_prefix_keys(ns, 2000), make_payloads(2000)
    body = b"".join(blocks)  # ~30x the bound: the service closes long before it is sent
    with svc.client() as framed, svc.client(frames=False) as http_only:
        info = framed.register(ns, BLOCK_BYTES)
        for c in (framed, http_only):
            for _ in range(5):
                with pytest.raises(TooLarge, match="max_body_bytes"):
                    c.put_blocks(info.ns, keys, body)
        assert framed.transport == "frames"
        conn = FramesConnection(f"{svc.arena_path}.sock", client_token(svc.token), 5.0, 1.0)
        conn.connect()
        assert conn.max_body_bytes == 64 * 1024
        conn.max_body_bytes = None  # a client that sends first: it still gets the answer
        request = msgpack.packb({"ns": info.ns, "keys": b"".join(keys), "data": body})
        status, doc = conn.call("/v1/blocks/put", request)
        assert status == 413 and b"max_body_bytes" in doc
        assert conn.sock is None  # the service closed that connection; so did the client
        assert framed.lookup(info.ns, keys).hits == 0
        assert http_only.put_blocks(info.ns, keys[:10], b"".join(blocks[:10])) == 10
        assert framed.lookup(info.ns, keys).hits == 10


def test_token_required_except_health(make_service) -> None:
    svc = make_service("auth", token="s3cret")
    with svc.client(token=None) as anon, svc.client(token="wrong") as bad, svc.client() as good:
        assert anon.health()  # /health is open for probes
        with pytest.raises(Unauthorized, match="bearer token"):
            anon.stats()
        with pytest.raises(Unauthorized):
            bad.register(make_namespace(), BLOCK_BYTES)
        with pytest.raises(Unauthorized):
            bad.metrics()
        ns = make_namespace()
        info = good.register(ns, BLOCK_BYTES)
        keys = make_prefix_keys(ns, 2)
        assert good.put_blocks(info.ns, keys, b"".join(make_payloads(2))) == 2
        with pytest.raises(Unauthorized):
            bad.get_blocks(info.ns, keys)
        assert good.lookup(info.ns, keys).hits == 2
