"""RAG with position-independent chunk reuse through a running cacheservice.

Start a service first:   python -m cacheservice serve --port 8642
Then:                    python examples/rag_blend.py [--url http://127.0.0.1:8642]

Three MuSiQue passages are encoded once (each alone after BOS) and stored under their chunk
keys. A second prompt puts the same passages in another order: the example finds them by
their declared spans, loads their KV from the service, re-rotates it to the new positions,
recomputes the 15% most deviating tokens (CacheBlend) and compares the greedy answer with a
full prefill. A service that dies midway only turns chunks into misses (computed fresh).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cacheservice.client import CacheClient  # noqa: E402
from cacheservice.errors import ServiceUnavailable  # noqa: E402
from connectors.blend import llama2c  # noqa: E402
from connectors.blend.base import forward, greedy  # noqa: E402
from connectors.blend.chunking import from_spans, segments  # noqa: E402
from connectors.blend.recompute import TopRatio, blend_prefill, encode_chunk  # noqa: E402
from connectors.blend.store import ChunkStore, KVLayout  # noqa: E402
from index.hashing import Namespace  # noqa: E402


def build(docs: list[torch.Tensor], order: list[int], question: torch.Tensor):
    bos = torch.tensor([llama2c.BOS])
    parts, spans, at = [bos], [], 1
    for j in order:
        parts.append(docs[j])
        spans.append((at, at + docs[j].shape[0]))
        at += docs[j].shape[0]
    parts.append(question)
    return torch.cat(parts), spans


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8642")
    ap.add_argument("--question", type=int, default=7, help="MuSiQue example index")
    args = ap.parse_args()
    model, tok = llama2c.load()
    ex = json.loads((llama2c.shared_dir() / "data" / "musique_s.json").read_text())[args.question]
    docs = [torch.tensor(tok.encode(c["text"][:340])[:28]) for c in ex["ctxs"][:3]]
    question = torch.tensor(tok.encode("question: " + ex["question"])[:20])
    cfg = model.cfg
    layout = KVLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, block_tokens=16)
    ns = Namespace("llama2c/aidreams260K", "float32", "blend-kv-v1", 16)
    with CacheClient(args.url, timeout=2.0) as client:
        try:
            store = ChunkStore(client, ns, layout)
        except ServiceUnavailable:
            hint = "start one with: python -m cacheservice serve"
            raise SystemExit(f"no service at {args.url}: {hint}") from None
        saved = sum(store.save(encode_chunk(model, d, torch.tensor([llama2c.BOS]))) for d in docs)
        print(f"stored {saved}/{len(docs)} passages under their chunk keys")
        prompt, spans = build(docs, [2, 0, 1], question)
        chunks = from_spans(prompt, spans, store.seed)
        found = store.load(prompt, chunks)
    hits = sum(v is not None for v in found.values())
    print(f"prompt of {prompt.shape[0]} tokens: {hits}/{len(chunks)} chunks reused from the cache")
    res = blend_prefill(model, segments(prompt, chunks, found), TopRatio(0.15))
    full = forward(model, prompt)
    ours = tok.decode(greedy(model, res.last_logits, res.kv, 16))
    ref = tok.decode(greedy(model, full.logits[-1], full.kv, 16))
    print(f"recomputed {res.recompute_fraction:.0%} of chunk tokens")
    print(f"blended: {ours!r}\nfull:    {ref!r}")


if __name__ == "__main__":
    main()
