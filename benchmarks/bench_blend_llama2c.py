"""Quality of position-independent chunk reuse on a real trained model (llama2.c 260K).

RAG prompts from MuSiQue: BOS + P passages + question. Each passage's KV is computed once,
alone at its canonical position (after BOS by default), and reused in prompts that put the
passages in other orders. Every method is compared with a full prefill of the same prompt:

    KL(last)   KL(full || method) of the next-token distribution after the prompt
    KL(q)      the same, averaged over the question tokens
    top1(q)    argmax agreement over the question tokens
    greedy     common prefix of the greedy continuations / continuation length
    recomp     recomputed chunk tokens / chunk tokens
    layers     chunk (token, layer) evaluations / (chunk tokens x layers)

Run: python benchmarks/bench_blend_llama2c.py [--questions 40] [--passages 3]
Exits 1 when a recompute method is not closer to full prefill than plain reuse.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.blend import llama2c  # noqa: E402
from connectors.blend.base import forward, greedy  # noqa: E402
from connectors.blend.recompute import (  # noqa: E402
    FirstK,
    NoRecompute,
    Policy,
    Segment,
    TopRatio,
    blend_prefill,
    encode_chunk,
)
from index.hashing import Namespace, chunk_key  # noqa: E402

METRICS = ("kl_last", "kl_q", "top1_q", "greedy", "recomp", "layers", "ms")


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def policies(args: argparse.Namespace) -> dict[str, Policy]:
    out: dict[str, Policy] = {"no-recompute": NoRecompute()}
    out |= {f"(a) first-{k}": FirstK(k) for k in args.k}
    out |= {
        f"(b) top-{r:.0%}@L{args.select_layer}": TopRatio(r, args.select_layer, args.by)
        for r in args.ratio
    }
    return out


def orders(p: int) -> list[list[int]]:
    rot = [(i + 1) % p for i in range(p)]
    return [rot, list(reversed(range(p)))]


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    model, tok = llama2c.load()
    data = json.loads((llama2c.shared_dir() / "data" / "musique_s.json").read_text())
    seed = Namespace("llama2c/aidreams260K", "float32", "blend-kv-v1", 16).seed
    bos = torch.tensor([llama2c.BOS])
    prefix = bos if args.canonical == "bos" else None
    pols = policies(args)
    acc: dict[str, dict[str, list[float]]] = {n: {m: [] for m in METRICS} for n in pols}
    store: dict[bytes, object] = {}  # chunk key -> ChunkKV, each passage encoded once
    for ex in data[: args.questions]:
        docs = [
            torch.tensor(tok.encode(c["text"][: 12 * args.passage_tokens])[: args.passage_tokens])
            for c in ex["ctxs"][: args.passages]
        ]
        for d in docs:
            key = chunk_key(d.tolist(), seed)
            if key not in store:
                store[key] = encode_chunk(model, d, prefix)
        q = torch.tensor(tok.encode("question: " + ex["question"])[: args.question_tokens])
        for order in orders(args.passages):
            segs = [Segment(bos)]
            segs += [Segment(docs[j], store[chunk_key(docs[j].tolist(), seed)]) for j in order]
            segs.append(Segment(q))
            tokens = torch.cat([s.tokens for s in segs])
            if tokens.shape[0] + args.cont > model.cfg.seq_len:
                raise SystemExit(f"prompt {tokens.shape[0]} + {args.cont} > seq_len: shorten")
            full = forward(model, tokens)
            ref = greedy(model, full.logits[-1], full.kv, args.cont)
            nq = q.shape[0]
            for name, pol in pols.items():
                t0 = time.perf_counter()
                res = blend_prefill(model, segs, pol)
                ms = 1000 * (time.perf_counter() - t0)
                out = greedy(model, res.last_logits, res.kv, args.cont)
                diff = [i for i, (x, y) in enumerate(zip(out, ref, strict=True)) if x != y]
                same = diff[0] if diff else args.cont
                a = acc[name]
                a["kl_last"].append(kl(full.logits[-1], res.last_logits))
                a["kl_q"].append(kl(full.logits[-nq:], res.logits[-nq:]))
                agree = full.logits[-nq:].argmax(-1) == res.logits[-nq:].argmax(-1)
                a["top1_q"].append(float(agree.double().mean()))
                a["greedy"].append(same / args.cont)
                a["recomp"].append(res.recompute_fraction)
                a["layers"].append(res.layer_fraction)
                a["ms"].append(ms)
    return {n: {m: sum(v) / len(v) for m, v in d.items()} for n, d in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--passages", type=int, default=3)
    ap.add_argument("--passage-tokens", type=int, default=28)
    ap.add_argument("--question-tokens", type=int, default=20)
    ap.add_argument("--cont", type=int, default=16, help="greedy continuation length")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--ratio", type=float, nargs="+", default=[0.15, 0.3])
    ap.add_argument("--select-layer", type=int, default=1)
    ap.add_argument("--by", choices=["k", "v", "kv"], default="kv")
    ap.add_argument("--canonical", choices=["bos", "bare"], default="bos",
                    help="encode each passage after BOS (start 1) or alone (start 0)")  # fmt: skip
    args = ap.parse_args()
    n_prompts = args.questions * 2
    print(f"{n_prompts} prompts: BOS + {args.passages} x {args.passage_tokens}-token passages "
          f"+ question, canonical={args.canonical}; reference = full prefill")  # fmt: skip
    table = run(args)
    print(f"{'method':<18}" + "".join(f"{m:>10}" for m in METRICS))
    for name, row in table.items():
        cells = "".join(
            f"{row[m]:>10.2f}" if m == "ms" else f"{row[m]:>10.5f}" if m.startswith("kl")
            else f"{row[m]:>10.3f}" for m in METRICS
        )  # fmt: skip
        print(f"{name:<18}{cells}")
    base = table["no-recompute"]["kl_q"]
    worse = [n for n, r in table.items() if n != "no-recompute" and not r["kl_q"] < base]
    for n, r in table.items():
        if n != "no-recompute":
            print(f"{n}: KL(q) {r['kl_q'] / base:.2f}x of no-recompute")
    if worse:
        print(f"FAIL: not closer to full prefill than no-recompute: {worse}")
        raise SystemExit(1)
    print("OK: every recompute method is closer to full prefill than no-recompute reuse")


if __name__ == "__main__":
    main()
