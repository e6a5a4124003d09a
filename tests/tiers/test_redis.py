"""RedisTier against a real redis-server started per test."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis

from tests.factories import make_block_chain, make_meta, make_payload
from tests.processes import RedisProcess
from tiers.base import HEADER_BYTES
from tiers.redis import RedisTier

pytestmark = pytest.mark.redis


@pytest.fixture
async def tier(redis_server: str):
    t = RedisTier(redis_server, 1 << 26, prefix="t:")
    yield t
    await t.close()


@pytest.fixture
def raw(redis_server: str):
    client = redis.Redis.from_url(redis_server)
    yield client
    client.close()


async def test_round_trip(tier: RedisTier, raw: redis.Redis):
    blocks = make_block_chain(3, 3000)
    assert await tier.put_many([(b.meta, b.payload) for b in blocks]) == [True] * 3
    value = raw.get(b"t:" + blocks[0].meta.key.hex().encode())
    assert value == blocks[0].meta.encode() + blocks[0].payload  # one value: header + payload
    got = await tier.get_many([b.meta.key for b in blocks] + [b"\2" * 16])
    assert [bytes(g.payload) for g in got[:3]] == [b.payload for b in blocks] and got[3] is None
    assert got[2].meta == blocks[2].meta
    assert await tier.contains_many([blocks[1].meta.key, b"\2" * 16]) == [True, False]
    assert tier.used_bytes == 3 * (HEADER_BYTES + 3000)
    assert await tier.delete(blocks[1].meta.key) and not await tier.contains(blocks[1].meta.key)
    assert await tier.get(blocks[1].meta.key) is None
    assert tier.used_bytes == 2 * (HEADER_BYTES + 3000) and tier.shared
    tier.check_integrity()


async def test_full_tier_refuses(redis_server: str):
    tier = RedisTier(redis_server, 2 * (HEADER_BYTES + 1000))
    blocks = make_block_chain(3, 1000)
    assert await tier.put_many([(b.meta, b.payload) for b in blocks]) == [True, True, False]
    assert not await tier.contains(blocks[2].meta.key)
    assert await tier.put(blocks[0].meta, blocks[0].payload)  # re-put of a stored block fits
    tier.check_integrity()
    await tier.close()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
async def test_corrupt_value_is_a_miss_and_deleted(tier: RedisTier, raw: redis.Redis, damage):
    payload = make_payload(2000, seed=11)
    meta = make_meta(payload, 11)
    await tier.put(meta, payload)
    rkey = b"t:" + meta.key.hex().encode()
    if damage == "flip":
        raw.setrange(rkey, HEADER_BYTES + 5, bytes([payload[5] ^ 0x40]))
    else:
        raw.set(rkey, raw.getrange(rkey, 0, HEADER_BYTES + 999))
    assert await tier.get(meta.key) is None
    assert raw.exists(rkey) == 0 and tier.used_bytes == 0
    tier.check_integrity()


async def test_scan_rebuilds_from_headers(redis_server: str, raw: redis.Redis):
    writer = RedisTier(redis_server, 1 << 24, prefix="t:")
    blocks = make_block_chain(600, 100)  # more than one SCAN batch
    await writer.put_many([(b.meta, b.payload) for b in blocks])
    await writer.close()
    raw.set(b"t:not-hex", b"x")  # foreign keys under the prefix are left alone
    raw.set(b"other:" + blocks[0].meta.key.hex().encode(), b"y")
    torn = b"t:" + blocks[5].meta.key.hex().encode()
    raw.set(torn, raw.getrange(torn, 0, HEADER_BYTES + 10))

    reader = RedisTier(redis_server, 1 << 24, prefix="t:")
    metas = {m.key: m async for m in reader.scan()}
    assert len(metas) == 599 and blocks[5].meta.key not in metas
    assert metas[blocks[7].meta.key] == blocks[7].meta
    assert raw.exists(torn) == 0 and raw.exists(b"t:not-hex") == 1
    assert reader.used_bytes == 599 * (HEADER_BYTES + 100)
    block = await reader.get(blocks[9].meta.key)
    assert block is not None and bytes(block.payload) == blocks[9].payload
    reader.check_integrity()
    await reader.close()


async def test_32_mib_value(tier: RedisTier):
    payload = make_payload(32 << 20, seed=12)
    meta = make_meta(payload, 12)
    assert await tier.put(meta, memoryview(payload))
    block = await tier.get(meta.key)
    assert block is not None and block.meta == meta and block.payload == payload
    tier.check_integrity()


async def test_dropped_connection_reconnects(tier: RedisTier, raw: redis.Redis):
    payload = make_payload(500, seed=13)
    meta = make_meta(payload, 13)
    await tier.put(meta, payload)
    assert raw.client_kill_filter(_type="normal", skipme=True) >= 1  # server drops the pool
    block = await tier.get(meta.key)
    assert block is not None and bytes(block.payload) == payload


async def test_server_down_is_a_miss_not_an_error(redis_proc: RedisProcess):
    tier = RedisTier(redis_proc.url, 1 << 20, connect_timeout=1.0, retry_after=0.2)
    payload = make_payload(700, seed=14)
    meta = make_meta(payload, 14)
    assert await tier.put(meta, payload)
    redis_proc.kill()
    start = time.monotonic()
    assert await tier.get(meta.key) is None
    assert await tier.put(make_meta(payload, 15), payload) is False
    assert await tier.contains_many([meta.key]) == [False]
    assert await tier.get_many([meta.key]) == [None]
    assert [m async for m in tier.scan()] == []
    time.sleep(0.25)  # past retry_after: the next call really tries the network again
    assert await tier.get(meta.key) is None
    assert time.monotonic() - start < 5
    assert tier.used_bytes == HEADER_BYTES + 700  # down is not gone: accounting kept
    tier.check_integrity()
    await tier.close()


async def test_corrupt_value_in_a_pipelined_batch(tier: RedisTier, raw: redis.Redis):
    blocks = make_block_chain(4, 300_000)  # values larger than the reader's line buffer
    assert await tier.put_many([(b.meta, b.payload) for b in blocks]) == [True] * 4
    rkey = b"t:" + blocks[1].meta.key.hex().encode()
    raw.setrange(rkey, HEADER_BYTES + 99_999, b"\0\0\0")
    keys = [b.meta.key for b in blocks]
    got = await tier.get_many([keys[0], keys[1], b"\3" * 16, keys[2], keys[3]])
    assert got[1] is None and got[2] is None and raw.exists(rkey) == 0
    assert [bytes(got[i].payload) for i in (0, 3, 4)] == [blocks[i].payload for i in (0, 2, 3)]
    assert tier.used_bytes == 3 * (HEADER_BYTES + 300_000)
    tier.check_integrity()


async def test_concurrent_batches_use_separate_connections(tier: RedisTier):
    blocks = make_block_chain(12, 200_000)
    items = [(b.meta, b.payload) for b in blocks]
    puts = await asyncio.gather(*(tier.put_many(items[i : i + 3]) for i in range(0, 12, 3)))
    assert puts == [[True] * 3] * 4
    keys = [b.meta.key for b in blocks]
    gets = await asyncio.gather(*(tier.get_many(keys[i::4]) for i in range(4)))
    for i, got in enumerate(gets):
        assert [bytes(g.payload) for g in got] == [b.payload for b in blocks[i::4]]
    assert (
        1 <= len(tier._idle[tier.url]) <= 4
    )  # one connection per concurrent round trip, kept idle
    tier.check_integrity()


async def test_selects_the_url_database(redis_proc: RedisProcess):
    tier = RedisTier(redis_proc.url[: -len("/0")] + "/3", 1 << 20, prefix="t:")
    payload = make_payload(100_000, seed=16)
    meta = make_meta(payload, 16)
    assert await tier.put(meta, payload)
    rkey = b"t:" + meta.key.hex().encode()
    db0, db3 = (redis.Redis.from_url(redis_proc.url[:-1] + db) for db in "03")
    assert db3.exists(rkey) == 1 and db0.exists(rkey) == 0
    assert (await tier.get(meta.key)).payload == payload
    db0.close()
    db3.close()
    await tier.close()


@pytest.mark.parametrize("op", ["put_many", "get_many"])
async def test_server_killed_mid_batch(redis_proc: RedisProcess, op: str):
    tier = RedisTier(redis_proc.url, 1 << 30, connect_timeout=1.0, retry_after=5.0)
    blocks = make_block_chain(8, 4 << 20)
    items = [(b.meta, b.payload) for b in blocks]
    if op == "get_many":
        assert await tier.put_many(items) == [True] * 8
    used = tier.used_bytes
    redis_proc.proc.send_signal(signal.SIGSTOP)  # the batch stalls part-way through
    start = time.monotonic()
    if op == "put_many":
        task = asyncio.ensure_future(tier.put_many(items))
    else:
        task = asyncio.ensure_future(tier.get_many([b.meta.key for b in blocks]))
    await asyncio.sleep(0.3)
    assert not task.done()
    redis_proc.kill()
    assert await asyncio.wait_for(task, 5) == ([False] * 8 if op == "put_many" else [None] * 8)
    assert await tier.put(*items[0]) is False  # within retry_after: no network touched
    assert time.monotonic() - start < 3
    assert tier.used_bytes == used
    tier.check_integrity()
    await tier.close()


async def test_stalled_server_times_out(redis_proc: RedisProcess):
    tier = RedisTier(redis_proc.url, 1 << 20, timeout=0.5, retry_after=0.2)
    payload = make_payload(1000, seed=17)
    meta = make_meta(payload, 17)
    assert await tier.put(meta, payload)
    redis_proc.proc.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert await tier.get(meta.key) is None
        assert 0.4 < time.monotonic() - start < 2
    finally:
        redis_proc.proc.send_signal(signal.SIGCONT)
    await asyncio.sleep(0.25)
    block = await tier.get(meta.key)  # the server answers again: a new connection reads it
    assert block is not None and block.payload == payload
    await tier.close()
