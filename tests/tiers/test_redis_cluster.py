"""The shared tier on a real Redis Cluster (3 masters + 3 replicas on loopback): blocks routed
by slot, read back verified by another host's tier, misses (never errors or wrong bytes) while
a master dies, hits again once its replica is promoted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factories import make_block_chain
from tests.processes import RedisClusterProcess, make_tls_certs, start_redis_cluster
from tiers.base import HEADER_BYTES, TierStartError
from tiers.redis_cluster import RedisClusterTier

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    c = start_redis_cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


async def make_tier(url: str, prefix: str) -> RedisClusterTier:
    tier = RedisClusterTier(url, 1 << 28, prefix=prefix, timeout=2.0, connect_timeout=1.0)
    await tier.start()
    return tier


async def test_blocks_spread_over_the_masters_and_another_host_reads_them(cluster) -> None:
    blocks = make_block_chain(64, size=8192)
    writer = await make_tier(cluster.url, "a:")
    assert all(await writer.put_many([(b.meta, b.payload) for b in blocks]))
    # Another host: its own client, no local knowledge of the keys.
    reader = await make_tier(cluster.url, "a:")
    assert await reader.contains_many([b.meta.key for b in blocks]) == [True] * 64
    got = await reader.get_many([b.meta.key for b in blocks])
    assert [bytes(g.payload) for g in got] == [b.payload for b in blocks]
    metas = [m async for m in reader.scan()]
    assert {m.key for m in metas} == {b.meta.key for b in blocks}
    per_master = [
        int(_keys(cluster, port)) for port in cluster.masters()
    ]  # the slots spread them over every master
    assert all(n > 0 for n in per_master), per_master
    assert reader.used_bytes == 64 * (HEADER_BYTES + 8192)
    await writer.close()
    await reader.close()


def _keys(cluster: RedisClusterProcess, port: int) -> str:
    return cluster.cli(port, "DBSIZE").strip() or "0"


async def test_kv_sized_values_move_whole_within_a_short_timeout(cluster) -> None:
    """32 MiB values (a 256-token chunk of an 8B model): each one SET, no timeout with a
    1 s wait budget (it bounds a stall, not a transfer), read back whole and verified."""
    tier = RedisClusterTier(cluster.url, 1 << 30, prefix="big:", timeout=1.0)
    await tier.start()
    blocks = make_block_chain(3, size=32 << 20, start=7000)
    assert all(await tier.put_many([(b.meta, b.payload) for b in blocks]))
    got = await tier.get_many([b.meta.key for b in blocks])
    assert [bytes(g.payload) == b.payload for g, b in zip(got, blocks, strict=True)] == [True] * 3
    assert tier.errors.io_error == 0
    for b in blocks:
        await tier.delete(b.meta.key)
    await tier.close()


async def test_a_stale_slot_map_follows_moved(cluster) -> None:
    """The fast path sends a key to the master its slot map names; when that map is stale
    (a resharding moved the slot), the node answers MOVED and the batch goes again through
    redis-py's cluster client, which follows it: the right bytes, no error, no miss."""
    blocks = make_block_chain(6, size=4096, start=8000)
    tier = await make_tier(cluster.url, "m:")
    assert all(await tier.put_many([(b.meta, b.payload) for b in blocks]))
    manager = tier._client.nodes_manager
    rkey = tier._rkey(blocks[0].meta.key)
    slot = tier._client.keyslot(rkey)
    owner = manager.get_node_from_slot(slot)
    other = next(n for n in manager.nodes_cache.values()
                 if n.server_type == "primary" and n.name != owner.name)  # fmt: skip
    manager.slots_cache[slot] = [other]  # what a client sees before it learns of a resharding
    got = await tier.get_many([b.meta.key for b in blocks])
    assert [bytes(g.payload) for g in got] == [b.payload for b in blocks]
    manager.slots_cache[slot] = [other]
    assert all(await tier.put_many([(b.meta, b.payload) for b in blocks]))
    assert tier.errors.io_error == 0
    assert manager.get_node_from_slot(slot).name == owner.name  # the map was learnt again
    await tier.close()


async def test_corrupt_value_is_a_miss_and_removed(cluster) -> None:
    import redis.asyncio.cluster as rc

    (block,) = make_block_chain(1, size=4096, start=500)
    tier = await make_tier(cluster.url, "c:")
    assert await tier.put(block.meta, block.payload)
    raw = rc.RedisCluster(host="127.0.0.1", port=int(cluster.url.rsplit(":", 1)[1]))
    key = b"c:" + block.meta.key.hex().encode()
    value = bytearray(await raw.get(key))
    value[HEADER_BYTES + 5] ^= 1
    await raw.set(key, bytes(value))
    assert await tier.get(block.meta.key) is None
    assert tier.errors.corrupt == 1 and not await raw.exists(key)
    await raw.aclose()
    await tier.close()


async def test_master_killed_is_misses_then_hits_after_failover(tmp_path: Path) -> None:
    cluster = start_redis_cluster(tmp_path / "cluster")
    try:
        tier = await make_tier(cluster.url, "f:")
        blocks = make_block_chain(48, size=4096, start=1000)
        assert all(await tier.put_many([(b.meta, b.payload) for b in blocks]))
        victim = cluster.masters()[0]
        cluster.kill(victim)  # kill -9 under traffic
        start = time.monotonic()
        got = await tier.get_many([b.meta.key for b in blocks])  # no raise, no hang
        assert time.monotonic() - start < 10
        for g, b in zip(got, blocks, strict=True):
            assert g is None or bytes(g.payload) == b.payload  # never wrong bytes
        cluster.wait_ok(timeout=30, masters=3)  # the replica took over the dead master's slots
        deadline = time.monotonic() + 20
        while (
            after := await tier.get_many([b.meta.key for b in blocks])
        ) and time.monotonic() < deadline:
            if all(g is not None for g in after) or tier._down_until <= time.monotonic():
                break
            time.sleep(0.2)
        lost = sum(g is None for g in after)  # writes the replica had not received yet
        print(f"failover: {lost} of {len(blocks)} blocks lost")
        assert lost < len(blocks) // 2, "more than one master's share of the blocks was lost"
        for g, b in zip(after, blocks, strict=True):
            assert g is None or bytes(g.payload) == b.payload
        while True:
            await tier.put_many([(b.meta, b.payload) for b in blocks])
            got = await tier.get_many([b.meta.key for b in blocks])
            if all(g is not None for g in got) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert [bytes(g.payload) for g in got if g is not None] == [b.payload for b in blocks]
        await tier.close()
    finally:
        cluster.stop()


async def test_wrong_password_is_a_start_up_error(tmp_path: Path) -> None:
    cluster = start_redis_cluster(tmp_path / "acl", masters=3, replicas=0)
    try:
        for port in cluster.nodes:
            cluster.cli(port, "ACL", "SETUSER", "cache", "on", ">s3cret", "~cs:*", "+@all")
        host_port = cluster.url.removeprefix("redis://")
        ok = await make_tier(f"redis://cache:s3cret@{host_port}", "cs:")
        (block,) = make_block_chain(1, size=1024)
        assert await ok.put(block.meta, block.payload)
        await ok.close()
        bad = RedisClusterTier(f"redis://cache:wrong@{host_port}", 1 << 20)
        with pytest.raises(TierStartError, match="refused"):
            await bad.start()
        await bad.close()
    finally:
        cluster.stop()


async def test_tls_cluster_round_trip_as_an_acl_user(tmp_path: Path) -> None:
    certs = make_tls_certs(tmp_path / "certs")
    cluster = start_redis_cluster(tmp_path / "tls", masters=3, replicas=0, tls=certs)
    try:
        assert cluster.url.startswith("rediss://")
        for port in cluster.nodes:
            cluster.cli(port, "ACL", "SETUSER", "kv", "on", ">tls-pass", "~t:*", "+@all")
        url = cluster.url.replace("rediss://", "rediss://kv:tls-pass@")
        tier = await make_tier(url, "t:")
        blocks = make_block_chain(16, size=4096, start=2000)
        assert all(await tier.put_many([(b.meta, b.payload) for b in blocks]))
        got = await tier.get_many([b.meta.key for b in blocks])
        assert [bytes(g.payload) for g in got] == [b.payload for b in blocks]
        await tier.close()
        bad = RedisClusterTier(url.replace("tls-pass", "nope"), 1 << 20)
        with pytest.raises(TierStartError, match="refused"):
            await bad.start()
        await bad.close()
        plain = RedisClusterTier(cluster.url.replace("rediss://", "redis://"), 1 << 20)
        await plain.start()  # plaintext against a TLS-only cluster: misses, never a hang
        (block,) = make_block_chain(1, size=1024)
        assert await plain.put(block.meta, block.payload) is False
        await plain.close()
    finally:
        cluster.stop()
