"""Two services as two hosts (own arenas and disks) share blocks through a real Redis Cluster:
what one stored, the other serves byte-identical without ever having seen the keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import BLOCK_BYTES, make_namespace, make_payloads, make_prefix_keys
from tests.processes import start_redis_cluster, start_service

pytestmark = pytest.mark.redis


def test_two_hosts_share_blocks_through_the_cluster(tmp_path: Path) -> None:
    cluster = start_redis_cluster(tmp_path / "cluster")
    try:
        extra = ["--redis-url", cluster.url, "--redis-mode", "cluster"]
        ns = make_namespace()
        keys, blocks = make_prefix_keys(ns, 24, seed=31), make_payloads(24, seed=31)
        writer = start_service(tmp_path / "a", extra=extra)
        with writer.client() as c:
            info = c.register(ns, BLOCK_BYTES)
            assert c.put_blocks(info.ns, keys, b"".join(blocks)) == 24
        assert writer.stop() == 0, writer.output()  # drains write-down into the cluster
        reader = start_service(tmp_path / "b", extra=extra)
        with reader.client() as c:
            info = c.register(ns, BLOCK_BYTES)
            assert c.lookup(info.ns, keys).hits == 24
            got = c.get_blocks(info.ns, keys)
            assert got.count == 24 and got.data == b"".join(blocks)
        assert reader.stop() == 0, reader.output()
    finally:
        cluster.stop()
