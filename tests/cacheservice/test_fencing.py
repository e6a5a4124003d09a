"""A writer or reader slower than its lease, in another process, can never make a key serve
another key's bytes: its slots cool before reuse, and a commit publishes only the bytes its
writer says it wrote (writer checksums). Two real processes and a real service."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import xxhash

from cacheservice.arena import ArenaView
from cacheservice.client import CacheClient
from index.hashing import spot_checksum
from tests.factories import BLOCK_BYTES, make_namespace, make_payloads, make_prefix_keys
from tests.processes import REPO, start_service

LATE_WRITER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from cacheservice.client import CacheClient
    from index.hashing import Namespace
    from cacheservice.arena import ArenaView

    url, ns_doc, key, data = sys.argv[2], json.loads(sys.argv[3]), bytes.fromhex(sys.argv[4]), \\
        bytes.fromhex(sys.argv[5])
    with CacheClient(url) as c:
        info = c.register(Namespace.from_dict(ns_doc), len(data))
        res = c.reserve(info.ns, [key])
        print(json.dumps({"slot": res.slots[0]}), flush=True)
        sys.stdin.readline()  # stalls here, past its lease, until told to write
        with ArenaView.open(info.arena["path"]) as arena:
            arena.payload(res.slots[0], len(data))[:] = data
        print(json.dumps({"committed": c.commit(res.lease)}), flush=True)
    """
)


def wait_for(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def write_and_commit(c: CacheClient, arena: ArenaView, ns: str, key: bytes, data: bytes):
    res = c.reserve(ns, [key])
    slot = res.slots[0]
    assert slot is not None
    arena.payload(slot, len(data))[:] = data
    return res, slot


def test_late_writer_never_publishes_into_another_key(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "svc", extra=["--lease-ms", "1000"])
    ns = make_namespace()
    k1, k2, k3 = make_prefix_keys(ns, 3, seed=1)
    d1, d2, d3 = make_payloads(3, seed=1)
    with svc.client() as c:
        info = c.register(ns, BLOCK_BYTES)
        w1 = subprocess.Popen(
            [sys.executable, "-c", LATE_WRITER, str(REPO), svc.url,
             json.dumps(ns.to_dict()), k1.hex(), d1.hex()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            s1 = json.loads(w1.stdout.readline())["slot"]
            wait_for(lambda: c.stats()["leases"] == 0)  # W1's lease expired: slot aborted
            assert c.stats()["cooling_slots"] >= 1
            with ArenaView.open(info.arena["path"]) as arena:
                # While it cools, W1's slot goes to nobody else.
                res2, s2 = write_and_commit(c, arena, info.ns, k2, d2)
                assert s2 != s1
                assert c.commit(res2.lease, checksums=[xxhash.xxh3_64_intdigest(d2)]) == 1
                # After cooling the slot is reused; W1 wakes up and scribbles over it.
                wait_for(lambda: c.stats()["cooling_slots"] == 0)
                res3, s3 = write_and_commit(c, arena, info.ns, k3, d3)
                assert s3 == s1, "the scenario needs W1's slot to be reused"
                w1.stdin.write("go\n")
                w1.stdin.flush()
                assert json.loads(w1.stdout.readline())["committed"] == 0
                assert bytes(arena.payload(s3, BLOCK_BYTES)) == d1  # the late write landed
                # ... and the commit that names what W2 wrote refuses to publish it.
                assert c.commit(res3.lease, checksums=[xxhash.xxh3_64_intdigest(d3)]) == 0
            got = c.get_blocks(info.ns, [k1, k2, k3], prefix=False)
            assert got.present == [False, True, False] and got.data == d2
            assert c.stats()["fenced"] == 1
        finally:
            w1.kill()
            w1.wait()
    svc.stop()


def test_spot_checked_commits_fence_scribbles_and_readers_catch_the_rest(tmp_path: Path) -> None:
    """A commit with spots (index.hashing.spot_checksum) is checked on a sample of the slot:
    other bytes over the sampled lines are fenced; a scribble between them is published
    under the writer's full checksum, which every read verifies: a miss, never its bytes."""
    # No disk tier: its write-down would read (and verify) the block before the test does.
    args = ["--slot-bytes", "262144", "--arena-bytes", "4MiB", "--disk-dir", ""]
    svc = start_service(tmp_path / "svc", extra=args)
    ns = make_namespace()
    size = 256 * 1024 - 4096
    k1, k2, k3 = make_prefix_keys(ns, 3, seed=5)
    d1, d2, d3 = make_payloads(3, size, seed=5)
    with svc.client() as c:
        info = c.register(ns, size)
        with ArenaView.open(info.arena["path"]) as arena:
            res, slot = write_and_commit(c, arena, info.ns, k1, d1)
            sums = [xxhash.xxh3_64_intdigest(d1)]
            assert c.commit(res.lease, checksums=sums, spots=[spot_checksum(d1)]) == 1
            res, slot = write_and_commit(c, arena, info.ns, k2, d2)
            arena.payload(slot, size)[:] = d3  # another writer's whole block landed on top
            sums = [xxhash.xxh3_64_intdigest(d2)]
            assert c.commit(res.lease, checksums=sums, spots=[spot_checksum(d2)]) == 0
            assert c.stats()["fenced"] == 1
            res, slot = write_and_commit(c, arena, info.ns, k3, d3)
            arena.payload(slot, size)[100] ^= 0xFF  # inside a line the spots do not sample
            sums = [xxhash.xxh3_64_intdigest(d3)]
            assert c.commit(res.lease, checksums=sums, spots=[spot_checksum(d3)]) == 1
            acq = c.acquire(info.ns, [k3], lease_ms=5000)  # what a connector verifies
            assert acq.checksums[0] != xxhash.xxh3_64_intdigest(arena.payload(acq.slots[0], size))
            c.release(acq.lease)
        got = c.get_blocks(info.ns, [k1, k2, k3], prefix=False)
        assert got.present == [True, False, False] and got.data == d1
    svc.stop()


def test_expired_reader_slot_cools_before_reuse(tmp_path: Path) -> None:
    # 16 slots: filling the arena evicts the leased block once its lease is gone.
    svc = start_service(tmp_path / "svc", extra=["--lease-ms", "800", "--arena-bytes", "64KiB"])
    ns = make_namespace()
    keys, blocks = make_prefix_keys(ns, 1, seed=2), make_payloads(1, seed=2)
    with svc.client() as c:
        info = c.register(ns, BLOCK_BYTES)
        assert c.put_blocks(info.ns, keys, blocks[0]) == 1
        acq = c.acquire(info.ns, keys)  # a reader that then stalls past its lease
        wait_for(lambda: c.stats()["leases"] == 0)
        other = make_namespace()
        filler = make_prefix_keys(other, 40, seed=3)
        info2 = c.register(other, BLOCK_BYTES)
        cooling_ends = time.monotonic() + 0.7  # lease_ms after the expiry we just saw
        for i, key in enumerate(filler):  # push the old block out of the 16-slot arena
            res = c.reserve(info2.ns, [key], parent=filler[i - 1] if i else b"\0" * 16)
            if time.monotonic() < cooling_ends:
                assert acq.slots[0] not in res.slots, "a slot whose reader may still copy reused"
            if res.lease:
                c.commit(res.lease)
        assert c.stats()["cooling_slots"] >= 1 or c.lookup(info.ns, keys).hits == 1
    svc.stop()
