"""Tiers on this host: HostTier vs np.copyto, DiskTier vs plain open/write/read/close of the same
sizes in the same directory (page cache warm for both unless a row says cold; neither fsyncs)."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from benchmarks.tier_duel import Row, duel, make_items
from tiers.base import HEADER_BYTES, checksum
from tiers.disk import DiskTier
from tiers.host import HostTier


async def bench_host(n: int, size: int, reps: int) -> list[Row]:
    src, items = make_items(n, size)
    dst = np.empty_like(src)
    slot = -(-(size + HEADER_BYTES) // 4096) * 4096
    path = os.path.join(
        "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
        f"bench-arena-{os.getpid()}",
    )
    host = HostTier(path, n * slot, slot)
    blocks = [(dst[i * size : (i + 1) * size], src[i * size : (i + 1) * size]) for i in range(n)]
    keys = [meta.key for meta, _ in items]

    def memcpy() -> float:
        t = time.perf_counter()
        for out, inp in blocks:
            np.copyto(out, inp)
        return time.perf_counter() - t

    async def store() -> float:
        for key in keys:
            await host.delete(key)
        t = time.perf_counter()
        for meta, payload in items:
            await host.put(meta, payload)
        return time.perf_counter() - t

    async def load_raw() -> float:
        t = time.perf_counter()
        for key, (out, _) in zip(keys, blocks, strict=True):
            np.copyto(out, np.frombuffer(host.payload_view(host.slot_of(key), size), np.uint8))
        return time.perf_counter() - t

    async def load_verified() -> float:
        t = time.perf_counter()
        for key, (out, _) in zip(keys, blocks, strict=True):
            block = await host.get(key)
            np.copyto(out, np.frombuffer(block.payload, np.uint8))
        return time.perf_counter() - t

    try:
        memcpy()  # fault the destination in
        put, base_put = await duel(reps + 1, store, memcpy, n * size)  # first put faults arena in
        raw, base_raw = await duel(reps, load_raw, memcpy, n * size)
        assert np.array_equal(dst, src), "host load returned different bytes"
        verified, base_ver = await duel(reps, load_verified, memcpy, n * size)
        host.check_integrity()
    finally:
        await host.close()
    return [
        Row("host", "store (put)", put, "np.copyto", base_put, 0.9),
        Row("host", "load (slot copy)", raw, "np.copyto", base_raw, 0.9),
        Row("host", "load (get+verify+copy)", verified, "np.copyto", base_ver, None),
    ]


async def bench_disk(n: int, size: int, reps: int, batch: int, root: str) -> list[Row]:
    _, items = make_items(n, size)
    nbytes = n * (size + HEADER_BYTES)
    raw_dir = os.path.join(root, "raw")
    os.makedirs(raw_dir)
    raw_paths = [os.path.join(raw_dir, f"{i}.blk") for i in range(n)]
    datas = [meta.encode() + bytes(payload) for meta, payload in items]
    disk = DiskTier(os.path.join(root, "tier"), 2 * nbytes)
    keys = [meta.key for meta, _ in items]
    batches = [items[i : i + batch] for i in range(0, n, batch)]

    def raw_write() -> float:
        for p in raw_paths:
            if os.path.exists(p):
                os.unlink(p)
        t = time.perf_counter()
        for p, data in zip(raw_paths, datas, strict=True):
            with open(p, "wb") as f:
                f.write(data)
        return time.perf_counter() - t

    def drop_cache(paths: list[str]) -> None:
        os.sync()  # dirty pages cannot be dropped
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    def raw_cold() -> float:
        drop_cache(raw_paths)
        return raw_read(1)

    async def tier_cold() -> float:
        drop_cache([disk._file(k) for k in keys])
        return await tier_read(1)

    slot = -(-(size + HEADER_BYTES) // 4096) * 4096
    arena = os.path.join(
        "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
        f"bench-promote-{os.getpid()}",
    )
    host = HostTier(arena, n * slot, slot)
    slots = [host.payload_view(host.alloc(), size) for _ in range(n)]

    def raw_into() -> float:
        t = time.perf_counter()
        for p, out in zip(raw_paths, slots, strict=True):
            with open(p, "rb") as f:
                f.seek(HEADER_BYTES)
                f.readinto(out)
        return time.perf_counter() - t

    async def tier_into() -> float:
        t = time.perf_counter()
        for key, out in zip(keys, slots, strict=True):
            assert await disk.get_into(key, out) is not None, "disk tier lost a block"
        return time.perf_counter() - t

    def raw_read(hold: int, verify: bool = False) -> float:
        # like the tier, keep ``hold`` freshly read buffers alive at once (a get_many batch);
        # ``verify`` adds the xxh3 pass that every tier read must make (the design's checksum)
        t = time.perf_counter()
        for i in range(0, n, hold):
            held = []
            for p in raw_paths[i : i + hold]:
                with open(p, "rb") as f:
                    held.append(f.read())
                if verify:
                    checksum(memoryview(held[-1])[HEADER_BYTES:])
            del held
        return time.perf_counter() - t

    async def tier_write() -> float:
        for key in keys:
            await disk.delete(key)
        t = time.perf_counter()
        for b in batches:
            await disk.put_many(b)
        return time.perf_counter() - t

    async def tier_read(hold: int) -> float:
        t = time.perf_counter()
        for i in range(0, n, hold):
            got = await disk.get_many(keys[i : i + hold])
            assert all(g is not None for g in got), "disk tier lost a block"
            del got  # hold one batch at a time, as the baseline does
        return time.perf_counter() - t

    w, wb = await duel(reps, tier_write, raw_write, nbytes)
    r1, rb1 = await duel(reps, lambda: tier_read(1), lambda: raw_read(1), nbytes)
    r, rb = await duel(reps, lambda: tier_read(batch), lambda: raw_read(batch), nbytes)
    v1, vb1 = await duel(reps, lambda: tier_read(1), lambda: raw_read(1, True), nbytes)
    v, vb = await duel(reps, lambda: tier_read(batch), lambda: raw_read(batch, True), nbytes)
    c, cb = await duel(reps, tier_cold, raw_cold, nbytes)
    try:
        p, pb = await duel(reps, tier_into, raw_into, n * size)
    finally:
        slots.clear()  # release the views into the arena before closing it
        await host.close()
    disk.check_integrity()
    return [
        Row("disk", f"write (put_many x{batch})", w, "open/write/close", wb, 0.8),
        Row("disk", "read (get, verified)", r1, "open/read/close", rb1, 0.8),
        Row(
            "disk",
            f"read (get_many x{batch}, verified)",
            r,
            f"open/read/close, hold {batch}",
            rb,
            0.8,
        ),
        Row("disk", "read (get, verified)", v1, "open/read/close + xxh3 verify", vb1, 0.8),
        Row(
            "disk",
            f"read (get_many x{batch}, verified)",
            v,
            f"open/read/close + xxh3, hold {batch}",
            vb,
            0.8,
        ),
        Row("disk", "cold read (get, verified)", c, "open/read/close, page cache dropped", cb, 0.8),
        Row("disk", "promote (get_into host slot)", p, "open/readinto host slot", pb, 0.8),
    ]
