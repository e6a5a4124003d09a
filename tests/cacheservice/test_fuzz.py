"""Property test over the msgpack API of a real service process (hypothesis): any body to any
endpoint gets an answer below 500 within a bound, and a rejected request changes neither the
counters nor any stored byte."""

from __future__ import annotations

import http.client
import time

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cacheservice.calls import headers as client_headers
from index.hashing import ROOT_KEY
from tests.factories import BLOCK_BYTES, make_namespace, make_payloads, make_prefix_keys
from tests.processes import ServiceProcess

ENDPOINTS = [
    "/v1/namespace", "/v1/lookup", "/v1/acquire", "/v1/release", "/v1/reserve", "/v1/commit",
    "/v1/exists", "/v1/blocks/put", "/v1/blocks/get", "/v1/chunks/register",
    "/v1/chunks/lookup",
]  # fmt: skip
WATCHED = ("blocks", "bytes", "leases", "namespaces", "chunks", "stores", "hits", "misses")
WATCHED += ("reserved_slots",)
NS = make_namespace()
KEYS = make_prefix_keys(NS, 6, seed=99)
BLOCKS = make_payloads(6, seed=99)

key = st.sampled_from([*KEYS, ROOT_KEY]) | st.binary(min_size=0, max_size=20)
keys = st.lists(st.sampled_from([*KEYS, ROOT_KEY]), max_size=8).map(b"".join) | st.binary(
    max_size=70
)
scalar = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
scalar |= st.binary(max_size=40) | st.floats(allow_nan=True)
value = st.recursive(
    scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                        max_size=4),
    max_leaves=12,
)  # fmt: skip


def fields(ns_id: str) -> st.SearchStrategy[dict]:
    known = {
        "ns": st.sampled_from([ns_id, "0" * 16, "zz"]) | scalar,
        "keys": keys | value,
        "parent": key | value,
        "chunk": key,
        "data": st.sampled_from([b"", b"".join(BLOCKS[:2]), BLOCKS[0][:-1]])
        | st.binary(max_size=64),
        "lease": st.text(max_size=20) | value,
        "lease_ms": st.integers(-5, 10**10) | value,
        "ok": st.lists(st.booleans(), max_size=8) | value,
        "checksums": st.lists(st.integers(0, 2**64 - 1) | st.none(), max_size=8) | value,
        "flat": st.booleans() | value,
        "prefix": st.booleans() | value,
        "num_tokens": st.integers(-3, 100) | value,
        "start_pos": st.integers(-3, 10**6) | value,
        "chunks": st.lists(key, max_size=4) | value,
        "block_bytes": st.integers(-1, 1 << 23) | value,
        "namespace": st.fixed_dictionaries({}, optional={
            "model": st.text(max_size=8) | value, "dtype": st.text(max_size=4) | value,
            "layout": st.text(max_size=4), "block_tokens": st.integers(-1, 64) | value,
        }) | value,
    }  # fmt: skip
    return st.fixed_dictionaries({}, optional=known)


def post(svc: ServiceProcess, path: str, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=5)
    try:
        conn.request("POST", path, body=body, headers=client_headers(svc.token))
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_any_request_is_answered_below_500_and_a_refusal_changes_nothing(
    service: ServiceProcess,
) -> None:
    with service.client() as c:
        info = c.register(NS, BLOCK_BYTES)
        assert c.put_blocks(info.ns, KEYS, b"".join(BLOCKS)) == 6

        def watched() -> dict:
            s = c.stats()
            return {k: s[k] for k in WATCHED}

        body = st.one_of(
            fields(info.ns).map(lambda d: msgpack.packb(d, use_bin_type=True)),
            value.map(lambda v: msgpack.packb(v, use_bin_type=True)),
            st.binary(max_size=200),
        )

        @settings(
            max_examples=1200,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(path=st.sampled_from(ENDPOINTS), body=body)
        def one(path: str, body: bytes) -> None:
            before = watched()
            start = time.monotonic()
            status = post(service, path, body)
            assert status < 500, (path, body)
            assert time.monotonic() - start < 5
            if status >= 400:
                assert watched() == before, (path, body, status)

        one()
        # Accepted requests may have stored more, but never changed what was stored.
        got = c.get_blocks(info.ns, KEYS, prefix=False)
        present = [b for b, p in zip(BLOCKS, got.present, strict=True) if p]
        assert got.data == b"".join(present) and c.health()
