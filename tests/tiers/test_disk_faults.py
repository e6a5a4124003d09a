"""The disk tier on real mounts and under real resource limits: only bytes that lie are
deleted; a filesystem without RWF_NOWAIT, a full filesystem or no file descriptors cost misses
or refused writes, never a stored block and never a claim of a copy that is not there."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from index.hashing import ROOT_KEY
from index.radix import PrefixTree
from tests.factories import make_key, make_payload
from tests.processes import REPO
from tiers.base import HEADER_BYTES, BlockMeta
from tiers.disk import DiskTier
from tiers.host import HostTier
from tiers.stack import TierStack


def items(n: int, size: int = 4096, start: int = 0) -> list[tuple[BlockMeta, bytes]]:
    out = []
    for i in range(start, start + n):
        payload = make_payload(size, seed=i)
        out.append((BlockMeta.for_payload(7, make_key(i), ROOT_KEY, payload), payload))
    return out


def on_disk(tier: DiskTier, key: bytes) -> bytes | None:
    try:
        with open(tier._file(key), "rb") as f:
            return f.read()[HEADER_BYTES:]
    except FileNotFoundError:
        return None


async def test_tmpfs_blocks_survive_a_restart(make_mount) -> None:
    root = make_mount("64m")
    tier = DiskTier(str(root / "disk"), 32 << 20)
    blocks = items(200)
    assert all(await tier.put_many(blocks))
    again = DiskTier(str(root / "disk"), 32 << 20)  # a restart on the same directory
    got = await again.get_many([m.key for m, _ in blocks])
    assert [bytes(b.payload) for b in got] == [p for _, p in blocks]
    for meta, payload in blocks[:20]:  # the read-into path (promotion) too
        out = memoryview(bytearray(len(payload)))
        assert (await again.get_into(meta.key, out)) == meta and bytes(out) == payload
    assert again.errors.corrupt == 0 and len(os.listdir(root / "disk" / "00")) >= 0
    again.check_integrity()


async def test_full_filesystem_claims_only_what_landed(make_mount) -> None:
    root = make_mount("256k")
    tier = DiskTier(str(root / "disk"), 16 << 20)  # a budget far over the filesystem
    blocks = items(120)
    # Two writers of the same blocks at once: the second must not answer for the first.
    first, second = await asyncio.gather(tier.put_many(blocks), tier.put_many(blocks))
    for (meta, payload), a, b in zip(blocks, first, second, strict=True):
        assert a == b, "two answers for one write"
        assert (on_disk(tier, meta.key) == payload) == a
    assert not all(first) and any(first)
    assert tier.errors.no_space > 0 and tier.errors.corrupt == 0
    assert tier.capacity_bytes <= 256 << 10
    tier.check_integrity()


async def test_full_disk_never_drops_the_host_copy(make_mount, tmp_path: Path) -> None:
    root = make_mount("192k")
    tree = PrefixTree()
    host = HostTier(str(tmp_path / "arena"), 64 * 8192, 8192)
    stack = TierStack(host, [DiskTier(str(root / "disk"), 16 << 20)], tree)
    await stack.start()
    blocks = items(150, size=4096)
    for meta, payload in blocks:
        await stack.store(meta, payload)
    await stack.drain()
    disk = stack.lower[0]
    for meta, payload in blocks:
        node = tree.get(meta.key)
        if node is not None and "disk" in node.tiers:
            assert on_disk(disk, meta.key) == payload, "the index claims a disk copy"
        if node is not None and "host" in node.tiers:
            assert bytes((await host.get(meta.key)).payload) == payload
    assert disk.errors.no_space > 0
    stack.check_integrity()
    await stack.close()


def test_out_of_file_descriptors_is_a_miss_not_a_deletion(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, os, resource, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.tiers.test_disk_faults import items
        from tiers.disk import DiskTier

        async def main():
            tier = DiskTier({str(tmp_path / "disk")!r}, 1 << 24)
            blocks = items(8)
            assert all(await tier.put_many(blocks))
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            hog = []
            try:
                while True:
                    hog.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            got = await tier.get_many([m.key for m, _ in blocks])
            assert got == [None] * 8, got
            for fd in hog:
                os.close(fd)
            got = await tier.get_many([m.key for m, _ in blocks])
            assert [bytes(b.payload) for b in got] == [p for _, p in blocks]
            assert tier.errors.corrupt == 0 and tier.errors.io_error >= 8
            print("ok", tier.errors)

        asyncio.run(main())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
