"""The one script a lent GPU machine runs (torch only there; no vLLM, no service): the blend
path's CUDA kernels against the same computation on the CPU, and the arena's DMA bandwidth.

1. RoPE re-rotation (SmolLM2's base 100000, NeoX half) of keys at position 0 to 8191, fp32
   and bf16: CUDA vs CPU, max |diff|.
2. Blended prefill (top-15% at layer 1) of a small random Llama on CUDA vs CPU: the same
   recomputed rows, KV and logits within fp32 rounding.
3. Per-token K/V reads and writes in vLLM's GPU layer view (dense_layout.py, NHD storage) on a
   CUDA cache vs the same on a CPU cache.
4. A chunk's blocks from pinned memory onto the GPU on a side stream (ChunkStore's CUDA
   path) vs the same bytes unpacked on the CPU.
5. GPU -> arena -> GPU: a shared-memory file like the service's arena, registered with
   ``cudaHostRegister`` (transfer.pin_arena's call), copied on a side stream, against
   ``cudaMemcpy`` from a pinned torch tensor of the same size in the same run (GiB/s, ratio).

    python benchmarks/device_check.py [--gib 2]     # prints one JSON object, exits 1 on a miss
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.blend.llama import Llama, LlamaShape  # noqa: E402
from connectors.blend.recompute import (  # noqa: E402
    ChunkKV,
    Segment,
    TopRatio,
    blend_prefill,
    encode_chunk,
)
from connectors.blend.rope import RopeSpec, apply_rope, rerotate  # noqa: E402
from connectors.blend.store import KVLayout, pack, unpack  # noqa: E402
from connectors.vllm.dense_layout import VLLM_LAYER_VIEW, DenseLayout  # noqa: E402
from connectors.vllm.kv_layout import TokenKV  # noqa: E402

DEV = torch.device("cuda")


def rope_check() -> dict:
    spec = RopeSpec(64, 100000.0, "neox")
    g = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4096, 3, 64, generator=g).to(dtype)
        at0 = apply_rope(x, 0, spec)
        cpu = rerotate(at0, 0, 8191, spec)
        gpu = rerotate(at0.to(DEV), 0, 8191, spec).cpu()
        out[str(dtype)] = float((cpu.float() - gpu.float()).abs().max())
    return out


def tiny_llama(device: torch.device) -> Llama:
    g = torch.Generator().manual_seed(1)
    D, H, KV, d, F, V, L = 256, 8, 2, 32, 512, 1000, 4

    def w(*s: int) -> torch.Tensor:
        return (torch.randn(*s, generator=g) * 0.05).to(device)

    layers = [
        {"rms_att": w(D) + 1, "wq": w(H * d, D), "wk": w(KV * d, D), "wv": w(KV * d, D),
         "wo": w(D, H * d), "rms_ffn": w(D) + 1, "gate": w(F, D), "up": w(F, D), "down": w(D, F)}
        for _ in range(L)
    ]  # fmt: skip
    emb = w(V, D)
    return Llama(emb, layers, w(D) + 1, emb, LlamaShape(H, KV, d, 1e-5, RopeSpec(d, 1e4, "neox")))


def blend_check() -> dict:
    g = torch.Generator().manual_seed(2)
    head, c1, c2, q = (torch.randint(3, 1000, (n,), generator=g) for n in (8, 200, 150, 20))
    results = {}
    for name, dev in (("cpu", torch.device("cpu")), ("cuda", DEV)):
        m = tiny_llama(dev)
        segs = [Segment(head), Segment(c2, encode_chunk(m, c2, head)),
                Segment(c1, encode_chunk(m, c1, head)), Segment(q)]  # fmt: skip
        results[name] = blend_prefill(m, segs, TopRatio(0.15, 1))
    a, b = results["cpu"], results["cuda"]
    pairs = zip(a.kv.keys + a.kv.values, b.kv.keys + b.kv.values, strict=True)
    kv = max(float((x - y.cpu()).abs().max()) for x, y in pairs)
    return {"same_rows": bool(torch.equal(a.recomputed, b.recomputed.cpu())), "kv_max_diff": kv,
            "logits_max_diff": float((a.logits - b.logits.cpu()).abs().max())}  # fmt: skip


def layout_check() -> dict:
    layout = DenseLayout(VLLM_LAYER_VIEW, 8, 16, 128)
    blocks, pos = torch.tensor([5, 1, 9]), torch.arange(3, 40)
    kv = TokenKV(torch.randn(37, 8, 128), torch.randn(37, 8, 128))
    caches = {}
    for name, dev in (("cpu", torch.device("cpu")), ("cuda", DEV)):
        nhd = torch.zeros(12, 16, 8, 256, device=dev)  # [B, N, H, C] storage
        layer = nhd.permute(0, 2, 1, 3)  # the logical [B, H, N, C] view vLLM hands over
        layout.write(layer, blocks, pos, kv)
        caches[name] = (layer, layout.read(layer, blocks, pos))
    (cl, cr), (gl, gr) = caches["cpu"], caches["cuda"]
    return {"cache_equal": bool(torch.equal(cl, gl.cpu())),
            "read_equal": bool(torch.equal(gr.k.cpu(), kv.k) and torch.equal(gr.v.cpu(), kv.v)),
            "cpu_read_equal": bool(torch.equal(cr.k, kv.k))}  # fmt: skip


def gib_s(fn, nbytes: int, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 2**30


def copy_on(stream: torch.cuda.Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)


def bandwidth_check(gib: float) -> dict:
    n = int(gib * 2**30)
    gpu = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    back = torch.empty_like(gpu)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        f.truncate(n)
        mm = mmap.mmap(f.fileno(), n)
        arena = torch.frombuffer(mm, dtype=torch.uint8)
        registered = int(torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), n, 0)) == 0
        side = torch.cuda.Stream()

        out = {"arena_registered": registered,
               "d2h_arena": gib_s(lambda: copy_on(side, arena, gpu), n),
               "h2d_arena": gib_s(lambda: copy_on(side, back, arena), n),
               "d2h_pinned": gib_s(lambda: pinned.copy_(gpu, non_blocking=True), n),
               "h2d_pinned": gib_s(lambda: back.copy_(pinned, non_blocking=True), n)}  # fmt: skip
        copy_on(side, back, arena)
        torch.cuda.synchronize()
        out["round_trip_exact"] = bool(torch.equal(back, gpu))
        if registered:
            torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())
        arena = None  # the tensor holds the map's buffer: drop it before closing the map
        mm.close()
    out["d2h_ratio"] = out["d2h_arena"] / out["d2h_pinned"]
    out["h2d_ratio"] = out["h2d_arena"] / out["h2d_pinned"]
    return out


def chunk_check() -> dict:
    """A chunk's blocks from pinned memory to the GPU on a side stream (ChunkStore's CUDA
    path, store.unpack + to_device) against the same bytes unpacked on the CPU."""
    layout = KVLayout(num_layers=4, kv_heads=3, head_dim=64, block_tokens=32, dtype="bfloat16")
    n = 300
    keys = [torch.randn(n, 3, 64).to(torch.bfloat16) for _ in range(4)]
    values = [torch.randn(n, 3, 64).to(torch.bfloat16) for _ in range(4)]
    chunk = ChunkKV(torch.arange(n), 0, keys, values)
    data = pack(chunk, layout)
    pinned = torch.empty(len(data), dtype=torch.uint8, pin_memory=True)
    pinned.numpy()[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8).numpy()
    host = unpack(chunk.tokens, 0, data, layout)
    gpu = unpack(chunk.tokens, 0, pinned, layout, DEV)
    torch.cuda.synchronize()
    same = all(
        torch.equal(h, g.cpu())
        for h, g in zip(host.keys + host.values, gpu.keys + gpu.values, strict=True)
    )
    return {"equal": bool(same), "on_device": gpu.keys[0].is_cuda,
            "host_equal": bool(torch.equal(host.keys[2], keys[2]))}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0, help="bytes per bandwidth copy")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False}))
        sys.exit(1)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "rope": rope_check(), "blend": blend_check(), "layout": layout_check(),
           "chunk": chunk_check(), "bandwidth": bandwidth_check(args.gib)}  # fmt: skip
    print(json.dumps(out, indent=1))
    ok = out["rope"]["torch.float32"] < 1e-4 and out["blend"]["same_rows"]
    ok &= out["blend"]["kv_max_diff"] < 1e-3 and out["layout"]["cache_equal"]
    ok &= out["layout"]["read_equal"] and out["bandwidth"]["round_trip_exact"]
    ok &= out["chunk"]["equal"] and out["chunk"]["on_device"] and out["chunk"]["host_equal"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
