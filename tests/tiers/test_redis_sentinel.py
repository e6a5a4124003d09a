"""The shared tier behind real Redis Sentinel (a master, a replica, three sentinels on
loopback): blocks through whichever server the sentinels name, misses (never errors, hangs or
wrong bytes) while the master is dead, hits again on the promoted replica."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.factories import make_block_chain
from tests.processes import start_redis_sentinel
from tiers.base import TierStartError
from tiers.redis_sentinel import RedisSentinelTier, SentinelURLError, parse_sentinel_url

pytestmark = pytest.mark.redis


async def make_tier(url: str, prefix: str = "s:") -> RedisSentinelTier:
    tier = RedisSentinelTier(url, 1 << 28, prefix=prefix, timeout=2.0, connect_timeout=1.0)
    await tier.start()
    return tier


def test_url_names_sentinels_master_and_credentials() -> None:
    sentinels, name, opts = parse_sentinel_url("redis://u:p%40ss@h1:26379,h2:26380/mm?db=2")
    assert sentinels == [("h1", 26379), ("h2", 26380)] and name == "mm"
    assert opts == {"db": "2", "username": "u", "password": "p@ss"}
    for bad in ("redis://h1:26379", "redis://h1/mm", "rediss://h1:1/mm"):
        with pytest.raises(SentinelURLError):
            parse_sentinel_url(bad)


async def test_master_killed_is_misses_then_hits_on_the_promoted_replica(tmp_path: Path) -> None:
    group = start_redis_sentinel(tmp_path / "sentinel")
    try:
        tier = await make_tier(group.url())
        reader = await make_tier(group.url())  # another host: knows nothing of the blocks
        blocks = make_block_chain(24, size=4096, start=3000)
        assert all(await tier.put_many([(b.meta, b.payload) for b in blocks]))
        got = await reader.get_many([b.meta.key for b in blocks])
        assert [bytes(g.payload) for g in got] == [b.payload for b in blocks]
        old = group.master()
        group.cli(old, "WAIT", "1", "2000")  # the replica has every block before the kill
        group.kill(old)
        start = time.monotonic()
        got = await reader.get_many([b.meta.key for b in blocks])  # no raise, no hang
        assert time.monotonic() - start < 5
        for g, b in zip(got, blocks, strict=True):
            assert g is None or bytes(g.payload) == b.payload  # never wrong bytes
        new = group.wait_promoted(old)
        assert new != old
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            got = await reader.get_many([b.meta.key for b in blocks])
            if all(g is not None for g in got):
                break
            await asyncio.sleep(0.3)
        assert [bytes(g.payload) for g in got] == [b.payload for b in blocks]
        more = make_block_chain(4, size=4096, start=4000)  # writes go to the new master
        assert all(await tier.put_many([(b.meta, b.payload) for b in more]))
        assert "role:master" in group.cli(new, "INFO", "replication")
        for t in (tier, reader):
            t.check_integrity()
            await t.close()
    finally:
        group.stop()


async def test_acl_password_and_a_wrong_one(tmp_path: Path) -> None:
    group = start_redis_sentinel(tmp_path / "auth", password="s3cret")
    try:
        tier = await make_tier(group.url(password="s3cret"))
        (block,) = make_block_chain(1, size=2048)
        assert await tier.put(block.meta, block.payload)
        assert bytes((await tier.get(block.meta.key)).payload) == block.payload
        await tier.close()
        bad = RedisSentinelTier(group.url(password="wrong"), 1 << 20)
        with pytest.raises(TierStartError, match="refused"):
            await bad.start()
        await bad.close()
    finally:
        group.stop()
