"""The vLLM connector worker's own save and load path against a real ``cacheservice serve``,
beside the memcpy limit measured in the same run:

    python benchmarks/bench_connector_path.py [--block-mib 2,32] [--gib 2] [--reps 3] \
        [--disk] [--lmcache]

KV is Llama-3.1-8B-shaped bf16 (32 layers, 8 KV heads, head_dim 128: 128 KiB per token) in a
block-major paged cache like vLLM's. Store = the worker's ``start_load_kv`` + ``wait_for_save``
as vLLM's step calls them, with no forward between (reserve over the frames socket, copy
every layer into the arena slots, xxh3 of each tile as it is copied) plus its commit (spot
checksums, one commit call), until ``flush`` returns. Retrieve = ``start_load_kv`` (acquire,
copy every layer into engine blocks, xxh3 of each tile as it lands, compared with the
writer's) until every layer has landed. Hashing the prompt into keys is timed
inside both (``prefix_keys``, as the scheduler does). The limit is one ``np.copyto`` of the
same bytes between two touched buffers. Each case is the median of ``--reps`` interleaved runs
(limit, store, retrieve) after one untimed warm-up run, each run on fresh keys; the service
has the host tier only (no disk, whose write-down would compete for the CPU), sized to hold
two runs (the reserve caps keep a quarter of the arena for readers).

``--disk`` adds the disk tier on the same path: a store until every block is on disk, cold
and warm loads after a service restart, beside open+write / open+readinto of the same bytes.
``--lmcache`` adds LMCache 0.5.6's engine on the same bytes with the same per-layer copies
(lmcache_peer.py, in a virtual environment made once under ~/.cache/cacheservice/peers),
its repetitions interleaved with ours: LMCache first, then the limit, our store and retrieve.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connectors.vllm.scheduler import (  # noqa: E402
    CacheLayout,
    CacheServiceMeta,
    LoadSpec,
    SaveSpec,
    Settings,
)
from connectors.vllm.worker import WorkerSide  # noqa: E402
from index.hashing import ROOT_KEY, Namespace, prefix_keys  # noqa: E402
from tests.processes import start_service  # noqa: E402

GIB = 1 << 30
LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128
TOKEN_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2  # 128 KiB
REQUEST_TOKENS = 4096  # one request's prompt: 512 MiB of KV
PEER = "lmcache-0.5.6"
PEER_LOG = Path(tempfile.gettempdir()) / "bench_connector_path.lmcache.log"


def make_worker(url: str, block_tokens: int, num_blocks: int) -> tuple[WorkerSide, list]:
    layer_bytes = block_tokens * 2 * KV_HEADS * HEAD_DIM * 2
    ns = Namespace("bench/llama-3.1-8b-shape", "bfloat16", "bench", block_tokens)
    names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(LAYERS))
    layout = CacheLayout((ns,), layer_bytes * LAYERS, names, layer_bytes, block_tokens)
    worker = WorkerSide(Settings(url=url, step_timeout_s=30.0, timeout_s=30.0), layout, 0,
                        num_blocks)  # fmt: skip
    caches = {
        n: torch.randn(num_blocks, 2, block_tokens, KV_HEADS, HEAD_DIM).to(torch.bfloat16)
        for n in names
    }
    worker.register_kv_caches(caches)
    return worker, list(caches.values())


def store(worker: WorkerSide, prompts: list[list[int]], block_ids: list[list[int]]) -> float:
    ns, bt = worker.ns, worker.layout.block_tokens
    start = time.perf_counter()
    for i, (prompt, ids) in enumerate(zip(prompts, block_ids, strict=True)):
        keys = tuple(prefix_keys(prompt, ns.seed, bt))
        meta = CacheServiceMeta(saves=[SaveSpec(f"s{i}", (keys,), (ROOT_KEY,), tuple(ids))])
        worker.start_load_kv(meta)  # as vLLM's step: the reserve goes out here, then the
        worker.wait_for_save(meta)  # forward (none here), then the copy waits for the slots
    worker.flush()
    return time.perf_counter() - start


def retrieve(worker: WorkerSide, prompts: list[list[int]], block_ids: list[list[int]]) -> float:
    ns, bt = worker.ns, worker.layout.block_tokens
    start = time.perf_counter()
    for i, (prompt, ids) in enumerate(zip(prompts, block_ids, strict=True)):
        keys = tuple(prefix_keys(prompt, ns.seed, bt))
        worker.start_load_kv(CacheServiceMeta(loads=[LoadSpec(f"l{i}", (keys,), tuple(ids))]))
        for name in worker.layout.layers:
            worker.wait_for_layer_load(name)
        errors = worker.take_load_errors()
        assert not errors, f"{len(errors)} blocks failed to load: {worker.stats}"
    return time.perf_counter() - start


def lmcache_python() -> str | None:
    """The python of a virtual environment with LMCache 0.5.6 (made on first use, beside this
    environment's packages: torch, numpy); None, said why, when it cannot be had."""
    env = Path.home() / ".cache" / "cacheservice" / "peers" / PEER
    python = env / "bin" / "python"
    probe = [str(python), "-c", "import lmcache.v1.cache_engine"]
    if not python.exists() or subprocess.run(probe, capture_output=True).returncode:
        try:
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env)],
                           check=True)  # fmt: skip
            pip = [str(python), "-m", "pip", "install", "-q"]
            subprocess.run([*pip, "--no-deps", PEER.replace("-", "==", 1)], check=True)
            subprocess.run([*pip, "aiofile"], check=True)  # the one import vLLM's deps lack
            subprocess.run(probe, check=True, capture_output=True)
        except subprocess.CalledProcessError as e:
            print(f"  LMCache not measured: {e}")
            return None
    return str(python)


class Peer:
    """LMCache's engine on the same bytes, in its own process, one repetition per ``run``."""

    def __init__(self, python: str, block_tokens: int, requests: int) -> None:
        script = str(REPO / "benchmarks" / "lmcache_peer.py")
        env = dict(os.environ, PYTHONHASHSEED="0")  # LMCache's builtin hash asks for it
        self.proc = subprocess.Popen(
            [python, script, str(block_tokens), str(requests)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=PEER_LOG.open("w"), text=True, env=env,
        )  # fmt: skip
        self._expect("READY")

    def _expect(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag) :].strip()
        raise RuntimeError(f"the LMCache peer exited ({self.proc.wait()}) before {tag}")

    def run(self) -> dict[str, float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("RESULT"))

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # LMCache's background threads keep it alive
            self.proc.kill()
            self.proc.wait()


class Geometry(NamedTuple):
    """One case's sizes: ``requests`` prompts of REQUEST_TOKENS in blocks of ``block_mib``;
    engine blocks ``src`` are saved from, ``dst`` (the second half) loaded into."""

    block_tokens: int
    block_bytes: int
    requests: int
    total_blocks: int
    nbytes: int
    slot: int
    src: list[list[int]]
    dst: list[list[int]]


def geometry(block_mib: int, gib: float) -> Geometry:
    block_tokens = (block_mib << 20) // TOKEN_BYTES
    block_bytes = block_tokens * TOKEN_BYTES
    requests = max(1, int(gib * GIB) // (REQUEST_TOKENS * TOKEN_BYTES))
    per_request = REQUEST_TOKENS // block_tokens
    total = requests * per_request
    src = [list(range(r * per_request, (r + 1) * per_request)) for r in range(requests)]
    dst = [[b + total for b in ids] for ids in src]
    return Geometry(block_tokens, block_bytes, requests, total, total * block_bytes,
                    block_bytes + 4096, src, dst)  # fmt: skip


def run_case(block_mib: int, gib: float, reps: int, work: Path, peer_python: str | None) -> None:
    block_tokens, _, requests, total_blocks, nbytes, slot, src, dst = geometry(block_mib, gib)
    svc = start_service(
        work / f"svc-{block_mib}",
        extra=[
            "--arena-bytes",
            str(slot * (2 * total_blocks + 8)),
            "--slot-bytes",
            str(slot),
            "--disk-dir",
            "",
        ],  # fmt: skip
    )
    worker, caches = make_worker(svc.url, block_tokens, 2 * total_blocks)
    a, b = np.ones(nbytes, np.uint8), np.ones(nbytes, np.uint8)  # both touched
    rng = np.random.default_rng(block_mib)
    times: dict[str, list[float]] = {"limit": [], "store": [], "retrieve": []}
    peer = Peer(peer_python, block_tokens, requests) if peer_python else None
    theirs: dict[str, list[float]] = {"limit": [], "store": [], "retrieve": []}
    try:
        # The first repetition of each side is a warm-up, not timed: an engine's connector
        # has long mapped its arena (a first reserve maps and populates all of it) and filled
        # its slots once, and LMCache has allocated its buffers.
        for rep in range(reps + 1):
            if peer is not None:  # interleaved: LMCache, then ours, in every repetition
                for k, v in peer.run().items():
                    if rep:
                        theirs[k].append(v)
            start = time.perf_counter()
            np.copyto(b, a)
            limit = time.perf_counter() - start
            prompts = [rng.integers(0, 1 << 17, REQUEST_TOKENS).tolist() for _ in range(requests)]
            stored, loaded = store(worker, prompts, src), retrieve(worker, prompts, dst)
            if rep:
                times["limit"].append(limit)
                times["store"].append(stored)
                times["retrieve"].append(loaded)
            for c in caches[:: LAYERS // 4]:  # what was loaded is what was saved
                assert torch.equal(c[src[0][0]], c[dst[0][0]]), "loaded KV differs"
            if not rep:
                worker.stats.update({k: 0.0 for k in worker.stats if k.endswith("_s")})
        assert worker.stats["saved_blocks"] == (reps + 1) * total_blocks, worker.stats
    finally:
        worker.close()
        svc.stop()
        if peer is not None:
            peer.close()
    rate = {k: nbytes / statistics.median(v) / GIB for k, v in times.items()}
    print(f"  {block_mib:>2} MiB blocks ({block_tokens} tokens), {nbytes / GIB:.2f} GiB/run:  "
          f"store {rate['store']:5.2f} GiB/s ({rate['store'] / rate['limit']:4.2f}x)   "
          f"retrieve {rate['retrieve']:5.2f} GiB/s ({rate['retrieve'] / rate['limit']:4.2f}x)   "
          f"np.copyto {rate['limit']:5.2f} GiB/s")  # fmt: skip
    if peer is not None:
        lm = {k: nbytes / statistics.median(v) / GIB for k, v in theirs.items()}
        print(f"     LMCache 0.5.6 engine, same bytes: store {lm['store']:5.2f} GiB/s "
              f"({lm['store'] / lm['limit']:4.2f}x of its np.copyto {lm['limit']:5.2f})   "
              f"retrieve {lm['retrieve']:5.2f} GiB/s ({lm['retrieve'] / lm['limit']:4.2f}x);  "
              f"ours / LMCache: store {rate['store'] / lm['store']:4.2f}x, "
              f"retrieve {rate['retrieve'] / lm['retrieve']:4.2f}x")  # fmt: skip
    phases = {k: round(v / reps, 3) for k, v in worker.stats.items() if k.endswith("_s")}
    print(f"     seconds per run: {phases}")


def _dropped(paths: list[Path]) -> None:
    """Out of the page cache: written back first (dirty pages cannot be dropped)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_limits(root: Path, files: int, size: int) -> dict[str, float]:
    """Seconds to write ``files`` files of ``size`` bytes with open+write (page cache, no
    fsync: the durability the disk tier gives KV blocks), then to read them back with
    open+readinto into one engine-side buffer, cold (dropped from the page cache) and warm."""
    root.mkdir(parents=True, exist_ok=True)
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    engine = np.ones((files, size), np.uint8)  # as large as the KV it stands for: no cache reuse
    paths = [root / f"{i:06d}.raw" for i in range(files)]
    start = time.perf_counter()
    for path in paths:
        with open(path, "wb", buffering=0) as f:
            f.write(payload)
    out = {"write": time.perf_counter() - start}
    for kind in ("cold", "warm"):
        if kind == "cold":
            _dropped(paths)
        start = time.perf_counter()
        for path, buf in zip(paths, engine, strict=True):
            with open(path, "rb", buffering=0) as f:
                f.readinto(buf)
        out[kind] = time.perf_counter() - start
    for path in paths:
        path.unlink()
    return out


def run_disk_case(block_mib: int, gib: float, reps: int, work: Path) -> None:
    """The disk tier under the connector: a store until every block is on disk (write-down
    after the commit, page cache, no fsync), then loads after a restart (host empty, the
    index rebuilt from disk, each block promoted into the arena by the acquire), cold (the
    block files dropped from the page cache) and warm."""
    g = geometry(block_mib, gib)
    total, nbytes, slot, src, dst = g.total_blocks, g.nbytes, g.slot, g.src, g.dst
    disk = work / f"disk-{block_mib}"
    svc = start_service(
        work / f"svcd-{block_mib}",
        extra=[
            "--arena-bytes", str(slot * (2 * total + 8)), "--slot-bytes", str(slot),
            "--disk-dir", str(disk), "--disk-bytes", str((reps + 1) * (nbytes + total * 8192)),
        ],
    )  # fmt: skip
    worker, _ = make_worker(svc.url, g.block_tokens, 2 * total)
    rng = np.random.default_rng(block_mib + 7)
    ours: dict[str, list[float]] = {"write": [], "cold": [], "warm": []}
    raw: dict[str, list[float]] = {"write": [], "cold": [], "warm": []}

    def reconnect() -> None:
        svc.restart()
        key = bytes(range(16))  # a miss: reopens the frames connection
        worker.link.call(worker.link.step_client.lookup, worker.ns.id, [key])
        worker.link.arena()  # the new arena mapped, as an engine has long done by its next hit

    try:
        for rep in range(reps):
            for k, v in disk_limits(work / "raw", total, g.block_bytes).items():
                raw[k].append(v)
            prompts = [rng.integers(0, 1 << 17, REQUEST_TOKENS).tolist() for _ in range(g.requests)]
            start = time.perf_counter()
            store(worker, prompts, src)
            with svc.client() as c:
                while c.stats()["blocks"]["disk"] < (rep + 1) * total:
                    time.sleep(0.002)
            ours["write"].append(time.perf_counter() - start)
            for kind in ("cold", "warm"):
                reconnect()
                if kind == "cold":
                    _dropped(sorted(disk.rglob("*.blk")))
                ours[kind].append(retrieve(worker, prompts, dst))
    finally:
        worker.close()
        svc.stop()
    rate = {k: nbytes / statistics.median(v) / GIB for k, v in ours.items()}
    lim = {k: nbytes / statistics.median(v) / GIB for k, v in raw.items()}
    print(f"  disk, {block_mib:>2} MiB blocks, {nbytes / GIB:.2f} GiB/run:  " + "   ".join(
        f"{k} {rate[k]:5.2f} GiB/s ({rate[k] / lim[k]:4.2f}x of {lim[k]:5.2f})"
        for k in ("write", "cold", "warm")))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--block-mib", default="2,32")
    p.add_argument("--gib", type=float, default=2.0, help="KV bytes per run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--disk",
        action="store_true",
        help="also the disk tier: store to disk, cold and warm loads after a restart",
    )
    p.add_argument(
        "--lmcache",
        action="store_true",
        help=f"also {PEER}'s engine on the same bytes (its own venv, made once)",
    )
    args = p.parse_args()
    peer_python = lmcache_python() if args.lmcache else None
    print(f"connector worker path vs np.copyto, Llama-3.1-8B-shaped bf16 KV, medians of "
          f"{args.reps} interleaved runs, torch threads {torch.get_num_threads()}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_path_") as tmp:
        for mib in args.block_mib.split(","):
            run_case(int(mib), args.gib, args.reps, Path(tmp), peer_python)
        for mib in args.block_mib.split(",") if args.disk else ():
            run_disk_case(int(mib), args.gib, args.reps, Path(tmp))


if __name__ == "__main__":
    main()
