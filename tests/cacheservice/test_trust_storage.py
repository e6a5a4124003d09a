"""What the service reads back from its media is untrusted, and what it acknowledged must be
there: poisoned headers on disk and in a shared Redis, tmpfs, kill -9 during writes, chunk
manifests that outlive their blocks. Real service processes, real files, real redis-server."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import msgpack
import pytest
import redis

from cacheservice.errors import CacheServiceError
from index.hashing import ROOT_KEY, chunk_block_keys, chunk_key
from tests.factories import BLOCK_BYTES, make_namespace, make_payloads, make_prefix_keys
from tests.processes import start_redis, start_service
from tiers.base import FLAG_MANIFEST, BlockMeta, encode_block


def plant_file(disk: Path, meta: BlockMeta, payload: bytes) -> None:
    h = meta.key.hex()
    (disk / h[:2]).mkdir(parents=True, exist_ok=True)
    (disk / h[:2] / f"{h}.blk").write_bytes(encode_block(meta, payload))


def poison(seed: int) -> list[tuple[BlockMeta, bytes]]:
    """Headers that parse and verify but would break a tree: the root as a key, a block that
    is its own parent, two blocks naming each other."""
    payload = make_payloads(1, seed=seed)[0]
    a, b, c = (bytes([seed, i]) * 8 for i in (1, 2, 3))
    metas = [
        BlockMeta.for_payload(1, ROOT_KEY, a, payload),
        BlockMeta.for_payload(1, c, c, payload),
        BlockMeta.for_payload(1, a, b, payload),
        BlockMeta.for_payload(1, b, a, payload),
    ]
    return [(m, payload) for m in metas]


def test_poisoned_disk_headers_are_skipped_at_start(tmp_path: Path) -> None:
    ns = make_namespace()
    keys, blocks = make_prefix_keys(ns, 4, seed=1), make_payloads(4, seed=1)
    svc = start_service(tmp_path / "svc")
    with svc.client() as c:
        info = c.register(ns, BLOCK_BYTES)
        assert c.put_blocks(info.ns, keys, b"".join(blocks)) == 4
    assert svc.stop() == 0
    for meta, payload in poison(9):
        plant_file(tmp_path / "svc" / "disk", meta, payload)
    start = time.monotonic()
    svc.start(timeout=10)
    assert time.monotonic() - start < 10
    with svc.client() as c:
        stats = c.stats()
        assert stats["skipped"] == 3, stats["errors"]
        assert c.get_blocks(info.ns, keys).data == b"".join(blocks)
        assert c.lookup(info.ns, [bytes([9, 3]) * 8]).hits == 0
    svc.stop(signal.SIGKILL)


@pytest.mark.redis
def test_poison_in_a_shared_redis_does_not_stop_any_host(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        r = redis.Redis.from_url(server.url)
        for meta, payload in poison(7):
            r.set(b"cs:" + meta.key.hex().encode(), encode_block(meta, payload))
        svcs = [
            start_service(tmp_path / name, extra=["--redis-url", server.url]) for name in ("a", "b")
        ]
        for svc in svcs:
            with svc.client() as c:
                info = c.register(make_namespace(), BLOCK_BYTES)
                # keys only Redis holds, both halves of the cycle among them: answers, no 500
                pair = [bytes([7, 1]) * 8, bytes([7, 2]) * 8]
                assert c.lookup(info.ns, pair).hits <= 2
                c.lookup(info.ns, [bytes([7, 3]) * 8])
                # another namespace's bytes (ns 1): never served to this one
                assert c.get_blocks(info.ns, pair, prefix=False).count == 0
                assert c.acquire(info.ns, pair).slots == []
                assert c.stats()["skipped"] >= 2
            svc.stop(signal.SIGKILL)
    finally:
        server.kill()


def test_tmpfs_disk_keeps_blocks_and_namespaces_across_restarts(make_mount) -> None:
    root = make_mount("64m")
    svc = start_service(root / "svc")
    ns = make_namespace()
    keys, blocks = make_prefix_keys(ns, 200, seed=2), make_payloads(200, seed=2)
    with svc.client() as c:
        info = c.register(ns, BLOCK_BYTES)
        for i in range(0, 200, 50):
            assert c.put_blocks(info.ns, keys[i : i + 50], b"".join(blocks[i : i + 50]),
                                parent=keys[i - 1] if i else ROOT_KEY) == 50  # fmt: skip
    svc.restart()
    with svc.client() as c:
        assert c.lookup(info.ns, keys).hits == 200  # the namespace came back too
        got = b"".join(c.get_blocks(info.ns, keys[i : i + 50]).data for i in range(0, 200, 50))
        assert got == b"".join(blocks)
        assert c.stats()["corrupt"] == 0
    svc.stop()


def test_namespace_is_durable_before_its_answer(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "svc")
    namespaces = [make_namespace() for _ in range(5)]
    with svc.client() as c:
        ids = [c.register(ns, BLOCK_BYTES).ns for ns in namespaces]
    svc.stop(signal.SIGKILL)  # no drain, no shutdown
    svc.start()
    with svc.client() as c:
        for ns_id in ids:
            assert c.lookup(ns_id, make_prefix_keys(namespaces[0], 1)).hits == 0  # known: no 404
    svc.stop(signal.SIGKILL)


def test_kill_9_during_writes_serves_only_what_was_written(tmp_path: Path) -> None:
    """Writers store blocks whose bytes are a function of their key; the service is killed
    mid-stream, restarted on the same disk, and every block it serves must be the one."""
    svc = start_service(tmp_path / "svc", extra=["--arena-bytes", "256KiB"])
    ns = make_namespace()
    with svc.client() as c:
        ns_id = c.register(ns, BLOCK_BYTES).ns
    written: dict[bytes, bytes] = {}
    rng = random.Random(5)
    for round_ in range(3):
        stop = threading.Event()

        def write(seed: int, stop: threading.Event = stop) -> None:
            with svc.client(timeout=2.0) as c:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    keys = make_prefix_keys(ns, 4, seed=seed * 100_000 + i)
                    blocks = make_payloads(4, seed=seed * 100_000 + i)
                    written.update(zip(keys, blocks, strict=True))
                    try:
                        c.put_blocks(ns_id, keys, b"".join(blocks))
                        c.get_blocks(ns_id, keys[:2])
                    except CacheServiceError:
                        return

        threads = [threading.Thread(target=write, args=(round_ * 10 + t,)) for t in range(2)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.3, 1.0))
        svc.stop(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join()
        svc.start()
        with svc.client() as c:
            keys = list(written)
            served = 0
            for i in range(0, len(keys), 64):
                got = c.get_blocks(ns_id, keys[i : i + 64], prefix=False)
                data = iter(got.data[j : j + BLOCK_BYTES] for j in range(0, len(got.data),
                                                                         BLOCK_BYTES))  # fmt: skip
                for key, present in zip(keys[i : i + 64], got.present, strict=True):
                    if present:
                        assert next(data) == written[key], "a block came back with other bytes"
                        served += 1
            assert served > 0
    svc.stop(signal.SIGKILL)


def test_chunks_leave_with_their_blocks(tmp_path: Path) -> None:
    # A disk that holds ~60 blocks: registering 200 chunks must evict most of them again.
    extra = ["--arena-bytes", "64KiB", "--disk-bytes", str(60 * (BLOCK_BYTES + 64))]
    svc = start_service(tmp_path / "svc", extra=extra)
    ns = make_namespace()
    registered = 0
    with svc.client() as c:
        ns_id = c.register(ns, BLOCK_BYTES).ns
        for i in range(200):
            tokens = list(range(i * 100, i * 100 + ns.block_tokens))
            ck, keys = chunk_key(tokens, ns.seed), chunk_block_keys(tokens, ns.seed, 16)
            registered += c.register_chunk(ns_id, ck, 16, 0, keys, make_payloads(1, seed=i)[0])
        assert registered > 0
        live = c.stats()["chunks"]
        assert live < registered  # evicted blocks took their chunks along
    svc.restart()
    with svc.client() as c:
        stats = c.stats()
        assert stats["chunks"] <= live
        manifests = (
            sum(1 for d in (tmp_path / "svc" / "disk").iterdir() for _ in d.iterdir())
            - stats["blocks"]["disk"]
        )
        assert manifests <= stats["chunks"] + stats["namespaces"]  # no orphan manifests
    svc.stop()


def test_corrupt_and_io_errors_are_counted_apart(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "svc", extra=["--arena-bytes", "16KiB"])
    ns = make_namespace()
    keys, blocks = make_prefix_keys(ns, 12, seed=3), make_payloads(12, seed=3)
    with svc.client() as c:
        ns_id = c.register(ns, BLOCK_BYTES).ns
        assert c.put_blocks(ns_id, keys, b"".join(blocks)) == 12
        time.sleep(0.5)  # write-down
        disk = tmp_path / "svc" / "disk"
        victim = disk / keys[0].hex()[:2] / f"{keys[0].hex()}.blk"
        data = bytearray(victim.read_bytes())
        data[100] ^= 1
        victim.write_bytes(bytes(data))
        os.sync()
        got = c.get_blocks(ns_id, keys, prefix=False)
        stats = c.stats()
        assert got.present[0] is False
        assert stats["corrupt"] == 1 and stats["io_error"] == 0 and stats["no_space"] == 0
    svc.stop()


def _stall(url: str, seconds: int) -> None:
    """Keep a redis-server busy (DEBUG SLEEP); the server may be killed before it answers."""
    try:
        redis.Redis.from_url(url).execute_command("DEBUG", "SLEEP", str(seconds))
    except redis.ConnectionError:
        pass


@pytest.mark.redis
@pytest.mark.parametrize("how", ["SIGSTOP", "DEBUG SLEEP"])
def test_lookup_never_waits_on_a_stalled_redis(tmp_path: Path, how: str) -> None:
    server = start_redis(tmp_path / "redis")
    svc = start_service(tmp_path / "svc", extra=["--redis-url", server.url])
    try:
        with svc.client(timeout=5.0) as c:
            ns = make_namespace()
            info = c.register(ns, BLOCK_BYTES)
            keys = make_prefix_keys(ns, 8, seed=4)
            assert c.lookup(info.ns, keys).hits == 0  # Redis answers: a plain miss
            if how == "SIGSTOP":
                server.proc.send_signal(signal.SIGSTOP)
            else:
                sleeper = threading.Thread(target=_stall, args=(server.url, 3))
                sleeper.start()
                time.sleep(0.2)
            times = []
            for i in range(10):
                start = time.monotonic()
                assert c.lookup(info.ns, make_prefix_keys(ns, 8, seed=10 + i)).hits == 0
                times.append(time.monotonic() - start)
            assert max(times) < 0.25, times  # the 50 ms budget plus HTTP, never Redis' pace
            assert c.stats()["remote_timeouts"] >= 1
    finally:
        if how == "SIGSTOP":
            server.proc.send_signal(signal.SIGCONT)
        svc.stop(signal.SIGKILL)
        server.kill()


def test_start_up_counts_what_it_removes(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "svc")
    assert svc.stop() == 0
    disk = tmp_path / "svc" / "disk"
    odd = msgpack.packb({"kind": "from-the-future", "x": 1})
    unknown = BlockMeta.for_payload(1, b"\x05" * 16, ROOT_KEY, odd, FLAG_MANIFEST)
    plant_file(disk, unknown, odd)
    payload = make_payloads(1, seed=6)[0]
    torn = BlockMeta.for_payload(1, b"\x06" * 16, ROOT_KEY, payload)
    plant_file(disk, torn, payload)
    torn_path = disk / "06" / f"{torn.key.hex()}.blk"
    torn_path.write_bytes(torn_path.read_bytes()[:-10])  # a file cut short by a crash
    svc.start()
    with svc.client() as c:
        assert c.stats()["scan_removed"] == 1
    assert not torn_path.exists()
    deadline = time.monotonic() + 5
    unknown_path = disk / "05" / f"{unknown.key.hex()}.blk"
    while unknown_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not unknown_path.exists(), "a manifest nobody reads must not hold disk forever"
    svc.stop()
