"""RedisTier against a real redis-server started per test."""

from __future__ import annotations

import time

import pytest
import redis

from tests.tiers.conftest import RedisProcess, make_meta, make_payload
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


async def test_round_trip(tier: RedisTier, raw: redis.Redis, make_blocks):
    blocks = make_blocks(3, 3000)
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


async def test_full_tier_refuses(redis_server: str, make_blocks):
    tier = RedisTier(redis_server, 2 * (HEADER_BYTES + 1000))
    blocks = make_blocks(3, 1000)
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


async def test_scan_rebuilds_from_headers(redis_server: str, raw: redis.Redis, make_blocks):
    writer = RedisTier(redis_server, 1 << 24, prefix="t:")
    blocks = make_blocks(600, 100)  # more than one SCAN batch
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
