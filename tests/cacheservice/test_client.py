"""Client behaviour: the async client over every endpoint, failure mapping (service down,
5xx -> ServiceUnavailable quickly), keep-alive across a restart, use from many threads, and
an in-process app (aiohttp test server) that survives a handler bug."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import aiohttp
import msgpack
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cacheservice.arena import ArenaView
from cacheservice.calls import headers as client_headers
from cacheservice.client import AsyncCacheClient, CacheClient
from cacheservice.config import ServiceConfig
from cacheservice.errors import ServiceUnavailable, UnknownNamespace, WrongBlockSize
from cacheservice.protocol import error_for
from cacheservice.server import SERVICE_KEY, create_app
from index.hashing import ROOT_KEY, chunk_block_keys, chunk_key
from tests.factories import BLOCK_BYTES, make_namespace, make_payloads, make_prefix_keys
from tests.processes import SLOT_BYTES, ServiceProcess, free_port


async def test_async_client_covers_every_endpoint(service: ServiceProcess) -> None:
    ns = make_namespace()
    keys, blocks = make_prefix_keys(ns, 4, seed=11), make_payloads(4, seed=11)
    async with AsyncCacheClient(service.url) as c:
        assert await c.health()
        info = await c.register(ns, BLOCK_BYTES)
        assert info.ns == ns.id
        assert await c.put_blocks(info.ns, keys[:2], b"".join(blocks[:2])) == 2
        assert (await c.lookup(info.ns, keys)).hits == 2
        assert await c.exists(info.ns, keys) == 2
        got = await c.get_blocks(info.ns, keys)
        assert got.count == 2 and got.data == b"".join(blocks[:2])

        res = await c.reserve(info.ns, keys, ROOT_KEY)
        assert res.slots[:2] == [None, None] and None not in res.slots[2:]
        arena = ArenaView.open(info.arena["path"])
        try:
            for slot, block in zip(res.slots[2:], blocks[2:], strict=True):
                arena.payload(slot, BLOCK_BYTES)[:] = block
            assert await c.commit(res.lease) == 2
            acq = await c.acquire(info.ns, keys, lease_ms=5000)
            assert [bytes(arena.payload(s, BLOCK_BYTES)) for s in acq.slots] == blocks
            assert await c.release(acq.lease) == 4
        finally:
            arena.close()

        tokens = list(range(16))
        ck, bkeys = chunk_key(tokens, ns.seed), chunk_block_keys(tokens, ns.seed, 16)
        assert await c.register_chunk(info.ns, ck, 16, 0, bkeys, make_payloads(1, seed=12)[0])
        (entry,) = await c.lookup_chunks(info.ns, [ck])
        assert entry.num_tokens == 16 and list(entry.keys) == bkeys
        assert (await c.stats())["stores"] >= 5
        assert "cacheservice_requests_total" in await c.metrics()
        with pytest.raises(UnknownNamespace):
            await c.lookup("0" * 16, keys)
        with pytest.raises(WrongBlockSize):
            await c.put_blocks(info.ns, keys[:1], b"short")


async def test_async_client_over_unix_socket(make_service) -> None:
    svc = make_service("unix", unix_socket=True)
    async with AsyncCacheClient(svc.url) as c:
        info = await c.register(make_namespace(), BLOCK_BYTES)
        assert (await c.lookup(info.ns, [b"\x01" * 16])).hits == 0


def test_service_down_is_unavailable_quickly(tmp_path: Path) -> None:
    with CacheClient(f"http://127.0.0.1:{free_port()}", timeout=5.0) as c:
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="cannot reach"):
            c.lookup("0" * 16, [bytes(16)])
        assert time.monotonic() - start < 2.0
        assert c.health() is False
    with CacheClient(f"unix://{tmp_path}/none.sock") as c, pytest.raises(ServiceUnavailable):
        c.stats()


async def test_async_service_down_is_unavailable() -> None:
    async with AsyncCacheClient(f"http://127.0.0.1:{free_port()}") as c:
        with pytest.raises(ServiceUnavailable):
            await c.stats()
        assert await c.health() is False


def test_keep_alive_client_survives_a_restart(make_service) -> None:
    svc = make_service("restart")
    ns = make_namespace()
    keys = make_prefix_keys(ns, 2)
    with svc.client() as c:
        info = c.register(ns, BLOCK_BYTES)
        c.put_blocks(info.ns, keys, b"".join(make_payloads(2)))
        svc.stop()
        with pytest.raises(ServiceUnavailable):
            c.lookup(info.ns, keys)  # down: a miss for the connector, not a crash
        svc.start()
        assert c.lookup(info.ns, keys).hits == 2  # same client object reconnects


def test_one_client_many_threads(service: ServiceProcess, client: CacheClient) -> None:
    ns = make_namespace()
    info = client.register(ns, BLOCK_BYTES)
    chains = [make_prefix_keys(ns, 3, seed=100 + t) for t in range(6)]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for _ in range(20):
                client.put_blocks(info.ns, chains[t], b"".join(make_payloads(3, seed=t)))
                assert client.lookup(info.ns, chains[t]).hits == 3
        except BaseException as e:  # surfaced below; a thread cannot fail the test itself
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert all(client.get_blocks(info.ns, ch).count == 3 for ch in chains)


@pytest.fixture
async def inproc(tmp_path: Path):
    """The app in this process on aiohttp's test server, with one deliberately buggy route."""
    cfg = ServiceConfig(
        port=free_port(),
        arena_path=str(tmp_path / "arena"),
        arena_bytes=64 * SLOT_BYTES,
        slot_bytes=SLOT_BYTES,
        disk_dir=str(tmp_path / "disk"),
        disk_bytes=1 << 22,
    )
    app = create_app(cfg)

    async def buggy(request: web.Request) -> web.Response:
        return web.json_response({"ratio": 1 / len(request.query)})  # ZeroDivisionError

    app.router.add_get("/v1/buggy", buggy)
    server = TestServer(app)
    await server.start_server()
    yield app, str(server.make_url("")).rstrip("/")
    await server.close()


async def test_handler_bug_is_500_and_service_stays_up(inproc) -> None:
    app, url = inproc
    async with (
        aiohttp.ClientSession(headers=client_headers(None)) as s,
        s.get(url + "/v1/buggy") as r,
    ):
        assert r.status == 500
        body = await r.read()
    doc = msgpack.unpackb(body, raw=False)
    assert doc["error"] == "internal" and "ZeroDivisionError" in doc["message"]
    err = error_for(500, body)  # what a client raises for it
    assert isinstance(err, ServiceUnavailable) and "ZeroDivisionError" in str(err)
    async with AsyncCacheClient(url) as c:
        ns = make_namespace()
        info = await c.register(ns, BLOCK_BYTES)
        keys = make_prefix_keys(ns, 2)
        assert await c.put_blocks(info.ns, keys, b"".join(make_payloads(2))) == 2
        assert (await c.lookup(info.ns, keys)).hits == 2
        text = await c.metrics()
        assert 'cacheservice_requests_total{endpoint="/v1/buggy",status="500"} 1' in text
    await app[SERVICE_KEY].drain()  # integrity holds once write-down has settled
    app[SERVICE_KEY].check_integrity()
