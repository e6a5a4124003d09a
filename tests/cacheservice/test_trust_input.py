"""Hostile requests against the real service process: poison edges, huge or repeated asks,
other namespaces' keys, browser-shaped requests. Each is refused (or a miss) and leaves every
stored byte and every slot as it was."""

from __future__ import annotations

import http.client
import time

import msgpack
import pytest

from cacheservice.calls import headers as client_headers
from cacheservice.client import CacheClient
from cacheservice.errors import BadRequest, TooLarge
from index.hashing import ROOT_KEY
from tests.factories import BLOCK_BYTES, make_namespace, make_payloads, make_prefix_keys
from tests.processes import ServiceProcess


def post(svc: ServiceProcess, path: str, body: bytes, **headers: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        hdrs = client_headers(svc.token) | {k.replace("_", "-"): v for k, v in headers.items()}
        conn.request("POST", path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, msgpack.unpackb(resp.read(), raw=False)
    finally:
        conn.close()


def pk(doc: object) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def host_state(c: CacheClient) -> tuple:
    s = c.stats()
    return s["blocks"]["host"], s["bytes"]["host"], s["leases"], s["reserved_slots"]


@pytest.fixture
def ns(client: CacheClient) -> str:
    return client.register(make_namespace(), BLOCK_BYTES).ns


def test_cycle_and_self_parent_are_400_and_consume_nothing(
    service: ServiceProcess, client: CacheClient, ns: str
) -> None:
    a, b = make_prefix_keys(make_namespace(), 2, seed=3)
    data = b"".join(make_payloads(2))
    before = host_state(client)
    for _ in range(50):  # repeated: a leak per request would exhaust the arena
        bodies = [
            ("/v1/blocks/put", {"ns": ns, "keys": a + b, "parent": b, "data": data}),
            ("/v1/blocks/put", {"ns": ns, "keys": a, "parent": a, "data": data[:BLOCK_BYTES]}),
            ("/v1/blocks/put", {"ns": ns, "keys": ROOT_KEY, "data": data[:BLOCK_BYTES]}),
            ("/v1/blocks/put", {"ns": ns, "keys": a + a, "data": data, "flat": True}),
            ("/v1/reserve", {"ns": ns, "keys": a + b, "parent": b}),
            ("/v1/reserve", {"ns": ns, "keys": ROOT_KEY}),
            ("/v1/chunks/register", {"ns": ns, "chunk": a, "num_tokens": 16, "start_pos": 0,
                                     "keys": a, "data": data[:BLOCK_BYTES]}),
        ]  # fmt: skip
        for path, doc in bodies:
            status, reply = post(service, path, pk(doc))
            assert status == 400, (path, reply)
    assert client.health() and host_state(client) == before


def test_cycle_across_requests_is_refused_without_a_hang(client: CacheClient, ns: str) -> None:
    a, b = make_prefix_keys(make_namespace(), 2, seed=4)
    one, two = make_payloads(2, seed=4)
    assert client.put_blocks(ns, [b], one, parent=a) == 1  # b hangs under a stub for a
    before = host_state(client)
    start = time.monotonic()
    assert client.put_blocks(ns, [a], two, parent=b) == 0  # a under b: a cycle, refused
    assert time.monotonic() - start < 2 and client.health()
    assert host_state(client) == before
    assert client.stats()["refused"] >= 1
    assert client.get_blocks(ns, [b], prefix=False).data == one


def test_repeated_keys_and_oversize_answers_are_refused(client: CacheClient, ns: str) -> None:
    keys = make_prefix_keys(make_namespace(), 2, seed=5)
    assert client.put_blocks(ns, keys, b"".join(make_payloads(2, seed=5))) == 2
    with pytest.raises(BadRequest, match="repeats"):
        client.get_blocks(ns, [keys[0]] * 4096, prefix=False)
    with pytest.raises(BadRequest, match="repeats"):
        client.lookup(ns, [keys[0], keys[0]])
    # 16 MiB of distinct keys' blocks would exceed the 64 MiB answer bound at 4 KiB blocks.
    big = client.register(make_namespace(), 4032)
    many = make_prefix_keys(make_namespace(), 20_000, seed=6)
    with pytest.raises(TooLarge, match="at most"):
        client.get_blocks(big.ns, many, prefix=False)


def test_msgpack_bombs_are_cheap_400s(service: ServiceProcess, client: CacheClient) -> None:
    rss_before = _rss(service)
    bombs = [
        b"\xdd" + (4_000_000).to_bytes(4, "big") + b"\x80" * 4_000_000,  # 4M empty maps
        b"\x81\xa2ns" + (b"\x91" * 100_000) + b"\xc0",  # 100k nested arrays
        b"\x81\xa2ns\xdb" + (1 << 31).to_bytes(4, "big"),  # a 2 GiB string, announced
        b"\xdf" + (1 << 20).to_bytes(4, "big") + b"\x00\x00" * 1000,  # a huge map header
    ]
    for body in bombs:
        status, reply = post(service, "/v1/lookup", body)
        assert status == 400, reply
    assert client.health() and _rss(service) - rss_before < 64 << 20


def _rss(svc: ServiceProcess) -> int:
    with open(f"/proc/{svc.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):  # peak: what the request cost at its worst
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_other_namespace_keys_read_nothing(client: CacheClient) -> None:
    a = client.register(make_namespace(), BLOCK_BYTES)
    b = client.register(make_namespace(), BLOCK_BYTES)
    keys, blocks = make_prefix_keys(make_namespace(), 8, seed=8), make_payloads(8, seed=8)
    assert client.put_blocks(a.ns, keys, b"".join(blocks)) == 8
    assert client.get_blocks(b.ns, keys, prefix=False).count == 0
    acq = client.acquire(b.ns, keys)
    assert acq.slots == [] and acq.lease == ""
    assert client.get_blocks(a.ns, keys).data == b"".join(blocks)


def test_empty_acquire_opens_no_lease(client: CacheClient, ns: str) -> None:
    before = client.stats()["leases"]
    for seed in range(200):
        acq = client.acquire(ns, make_prefix_keys(make_namespace(), 1, seed=100 + seed))
        assert acq.lease == "" and acq.slots == []
    assert client.stats()["leases"] == before


def test_lease_length_is_capped_by_the_service(make_service) -> None:
    svc = make_service(extra=["--lease-ms", "600"])
    with svc.client() as c:
        ns = c.register(make_namespace(), BLOCK_BYTES).ns
        keys = make_prefix_keys(make_namespace(), 4, seed=9)
        assert c.put_blocks(ns, keys, b"".join(make_payloads(4, seed=9))) == 4
        c.acquire(ns, keys, lease_ms=3_600_000)
        c.reserve(ns, make_prefix_keys(make_namespace(), 4, seed=10))
        assert c.stats()["leases"] == 2
        deadline = time.monotonic() + 5
        while c.stats()["leases"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.stats()["leases"] == 0


def test_one_reserve_cannot_take_the_arena(make_service) -> None:
    svc = make_service()  # 256 slots of 4 KiB
    with svc.client() as c:
        ns = c.register(make_namespace(), BLOCK_BYTES).ns
        old = make_prefix_keys(make_namespace(), 100, seed=11)
        assert c.put_blocks(ns, old, b"".join(make_payloads(100, seed=11))) == 100
        res = c.reserve(ns, make_prefix_keys(make_namespace(), 1000, seed=12)[:1000])
        granted = sum(s is not None for s in res.slots)
        assert 0 < granted <= 128
        again = c.reserve(ns, make_prefix_keys(make_namespace(), 1000, seed=13))
        assert granted + sum(s is not None for s in again.slots) <= 192
        c.release(res.lease)
        c.release(again.lease)
        assert c.lookup(ns, old).hits > 0  # not everything older was evicted for it


def test_browser_shaped_requests_are_refused(service: ServiceProcess, ns: str) -> None:
    body = pk({"ns": ns, "keys": b""})
    assert post(service, "/v1/lookup", body, Origin="http://evil.example")[0] == 403
    assert post(service, "/v1/lookup", body, Host="attacker.example:8642")[0] == 403
    assert post(service, "/v1/lookup", body, Content_Type="text/plain")[0] == 415
    assert post(service, "/v1/lookup", body, Host=f"localhost:{service.port}")[0] == 200
    assert post(service, "/v1/lookup", body, Host=f"127.0.0.1:{service.port}")[0] == 200


def test_allowed_hosts_opens_a_name(make_service) -> None:
    svc = make_service(extra=["--allowed-hosts", "cache.internal"])
    body = pk({})
    assert post(svc, "/v1/lookup", body, Host="cache.internal")[0] == 400  # past the guard
    assert post(svc, "/v1/lookup", body, Host="other.internal")[0] == 403


def test_readers_together_cannot_pin_the_arena(make_service) -> None:
    svc = make_service()  # 256 slots
    with svc.client() as c:
        ns = c.register(make_namespace(), BLOCK_BYTES).ns
        leases = []
        for seed in range(6):  # 6 prompts of 60 blocks: 360 blocks, more than the arena holds
            keys = make_prefix_keys(make_namespace(), 60, seed=200 + seed)
            c.put_blocks(ns, keys, b"".join(make_payloads(60, seed=seed)))
            leases.append(c.acquire(ns, keys))
        pinned = sum(len(a.slots) for a in leases)
        assert pinned <= 192, pinned  # three quarters of the slots at most
        fresh = c.reserve(ns, make_prefix_keys(make_namespace(), 8, seed=300))
        assert all(s is not None for s in fresh.slots), "a writer found no room"
        c.release(fresh.lease)
        for a in leases:
            if a.lease:
                c.release(a.lease)
