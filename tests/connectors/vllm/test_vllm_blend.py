"""The blend connector inside real vLLM CPU engines (subprocesses) beside a real service.

Request A = system + c1 + c2 + question A declares c1 and c2 and stores them. Request B =
system + c2 + c1 + question B, in a fresh engine, finds both at new positions: the connector
claims the prefix through c1, blends it, and vLLM computes question B on top. Deviation from a
plain engine's full prefill is measured on the first generated token's whole distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from connectors.blend import llama2c
from connectors.blend.chunking import from_spans
from tests.connectors.vllm.blend_support import (
    make_blend_llama,
    make_tokens,
    run_blend_engine,
    start_blend_service,
)
from tests.connectors.vllm.engines import ask_while_stopped
from tests.processes import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

_rng = np.random.default_rng(0)
SYS, C1, C2 = make_tokens(8, _rng), make_tokens(60, _rng), make_tokens(60, _rng)
QA, QB = make_tokens(20, _rng), make_tokens(20, _rng)
PROMPT_A, PROMPT_B = SYS + C1 + C2 + QA, SYS + C2 + C1 + QB
CHUNKS = [[8, 68], [68, 128]]  # the same spans in both prompts; in B, c1 ends at 128 = 4 blocks
CLAIMED = 128
# The same chunks found by separator tokens; the claim (128) cuts c1 after its first 58 tokens.
SEP = 1
PROMPT_S = SYS + [SEP] + C2 + [SEP] + C1 + [SEP] + QB
SEPARATED = {"separators": [SEP], "chunk_range": [9, 130], "policy": "full"}
POLICIES = ("full", "none", "first_k", "top_ratio")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return make_blend_llama(tmp_path_factory.mktemp("blend_llama"))


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Full prefill by an engine without the connector."""
    log = tmp_path_factory.mktemp("ref") / "engine.log"
    reqs = [{"prompt": PROMPT_A}, {"prompt": PROMPT_B}, {"prompt": PROMPT_S}]
    res = run_blend_engine({"model": model.path, "requests": reqs}, log)
    return dict(zip("ABS", res["outputs"], strict=True))


def kl_first_token(ref: dict, got: dict) -> float:
    """KL(full prefill || blended) of the first generated token's distribution."""
    p, q = np.array(ref["logprobs"][0]), np.array(got["logprobs"][0])
    return float((np.exp(p) * (p - q)).sum())


def test_blend_hit_with_bounded_deviation(model, reference, tmp_path: Path):
    svc = start_blend_service(tmp_path / "service")
    try:
        store = {"model": model.path, "url": svc.url,
                 "requests": [{"prompt": PROMPT_A, "params": {"chunks": CHUNKS}}]}  # fmt: skip
        a = run_blend_engine(store, tmp_path / "a.log")
        reqs = [{"prompt": PROMPT_B, "params": {"chunks": CHUNKS, "policy": p}} for p in POLICIES]
        reqs.append({"prompt": PROMPT_S, "params": SEPARATED})
        b = run_blend_engine({"model": model.path, "url": svc.url, "requests": reqs},
                             tmp_path / "b.log")  # fmt: skip
    finally:
        svc.stop()
    (out_a,) = a["outputs"]
    assert out_a["cached"] == 0 and a["worker"]["saved_chunks"] == 2, "a miss, then stored"
    assert out_a["tokens"] == reference["A"]["tokens"]
    assert b["worker"]["blended_requests"] == len(POLICIES) + 1
    assert b["worker"]["chunk_hits"] == 2 * len(POLICIES) + 2
    assert b["worker"]["failed_requests"] == 0
    assert b["worker"]["saved_chunks"] == 0, "blended KV is never stored as a chunk"
    assert b["worker"]["engine_weights"], "the recompute runs the engine's own modules"
    assert b["worker"]["model_found_via"] == "caller", "vLLM's model runner held the model"
    *outs, sep = b["outputs"]
    assert sep["cached"] == CLAIMED and sep["tokens"] == reference["S"]["tokens"]
    assert kl_first_token(reference["S"], sep) < 1e-5, "a cut chunk's head is placed exactly"
    got = dict(zip(POLICIES, outs, strict=True))
    assert all(o["cached"] == CLAIMED for o in got.values()), "B's prefix through c1 is a hit"
    kl = {p: kl_first_token(reference["B"], o) for p, o in got.items()}
    agree = {
        p: sum(x == y for x, y in zip(o["tokens"], reference["B"]["tokens"], strict=True))
        for p, o in got.items()
    }
    print(f"KL of the first token vs full prefill: {kl}; greedy agreement of 4: {agree}")
    # Recomputing every chunk token reproduces the full prefill: layout and splice are exact.
    assert kl["full"] < 1e-5 and got["full"]["tokens"] == reference["B"]["tokens"]
    # Plain reuse has lost the cross-chunk attention; selective recompute restores part of it.
    assert kl["none"] > 1e-3
    assert kl["top_ratio"] < 0.75 * kl["none"]
    assert kl["first_k"] <= kl["none"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """The trained llama2.c model as an HF directory, its tokenizer and MuSiQue examples."""
    import json

    from tests.connectors.vllm.llama2c_hf import convert

    root = llama2c.shared_dir()
    assert root is not None, "the llama2.c model and MuSiQue ship in tests/assets"
    data = root / "data" / "musique_s.json"
    path = convert(tmp_path_factory.mktemp("llama2c_hf"), root)
    return str(path), llama2c.load(root).tokenizer, json.loads(data.read_text())


def test_blend_on_a_trained_model_beats_plain_reuse(trained, tmp_path: Path):
    """Real text: BOS + passage 1 + passage 2 + a question stores both passages; BOS + passage 2
    + passage 1 + another question reuses them (claim: 96 of 116 tokens, inside the model's 128
    positions). Over six MuSiQue examples recompute must beat plain reuse."""
    path, tok, examples = trained
    n1, n2, nq = 47, 48, 20

    def enc(text: str, n: int) -> list[int]:
        ids = tok.encode(text)[:n]
        assert len(ids) == n, "MuSiQue passages and questions are long enough"
        return ids

    stores, blends = [], []
    other_q = enc("question: " + examples[-1]["question"], nq)
    for ex in examples[:6]:
        p1, p2 = enc(ex["ctxs"][0]["text"], n1), enc(ex["ctxs"][1]["text"], n2)
        q = enc("question: " + ex["question"], nq)
        stores.append(([llama2c.BOS, *p1, *p2, *other_q], [[1, 1 + n1], [1 + n1, 1 + n1 + n2]]))
        blends.append(([llama2c.BOS, *p2, *p1, *q], [[1, 1 + n2], [1 + n2, 1 + n1 + n2]]))
    base = {"model": path, "max_model_len": 128, "skip_tokenizer_init": True, "max_tokens": 8}
    ref = run_blend_engine({**base, "requests": [{"prompt": p} for p, _ in blends]},
                           tmp_path / "ref.log")  # fmt: skip
    svc = start_blend_service(tmp_path / "service")
    try:
        reqs = [{"prompt": p, "params": {"chunks": c}} for p, c in stores]
        a = run_blend_engine({**base, "url": svc.url, "requests": reqs}, tmp_path / "a.log")
        reqs = [{"prompt": p, "params": {"chunks": c, "policy": pol}}
                for p, c in blends for pol in POLICIES]  # fmt: skip
        b = run_blend_engine({**base, "url": svc.url, "requests": reqs}, tmp_path / "b.log")
    finally:
        svc.stop()
    assert a["worker"]["saved_chunks"] == 2 * len(stores)
    assert b["worker"]["blended_requests"] == len(reqs) and b["worker"]["failed_requests"] == 0
    kl = {p: [] for p in POLICIES}
    agree = {p: 0 for p in POLICIES}
    for i, r in enumerate(ref["outputs"]):
        for j, pol in enumerate(POLICIES):
            out = b["outputs"][i * len(POLICIES) + j]
            assert out["cached"] == 96, "the prefix through the second passage's 3rd block"
            kl[pol].append(kl_first_token(r, out))
            agree[pol] += sum(x == y for x, y in zip(out["tokens"], r["tokens"], strict=True))
    mean = {p: float(np.mean(v)) for p, v in kl.items()}
    print(f"trained model, mean first-token KL: {mean}; greedy agreement of 48: {agree}")
    assert max(kl["full"]) < 1e-5 and agree["full"] == 48
    assert mean["none"] > 1e-3, "plain reuse of reordered passages does deviate"
    assert mean["first_k"] < 0.5 * mean["none"]
    assert mean["top_ratio"] < mean["none"]
    assert agree["first_k"] >= agree["none"] and agree["top_ratio"] >= agree["none"]


def test_service_down_computes_normally(model, reference, tmp_path: Path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    reqs = [{"prompt": p, "params": {"chunks": CHUNKS}} for p in (PROMPT_A, PROMPT_B)]
    res = run_blend_engine({"model": model.path, "url": url, "requests": reqs},
                           tmp_path / "down.log")  # fmt: skip
    for out, ref in zip(res["outputs"], (reference["A"], reference["B"]), strict=True):
        assert out["cached"] == 0 and out["tokens"] == ref["tokens"]
        assert abs(kl_first_token(ref, out)) < 1e-5
    assert res["worker"]["saved_chunks"] == 0


def test_failed_blend_reports_its_blocks_and_writes_nothing(tmp_path: Path):
    """A blend that cannot run (here: service down, no served model) hands every claimed
    block back as a load error, which vLLM recomputes; the paged cache is left untouched."""
    import time

    import torch

    from connectors.vllm.blend_scheduler import BlendLoad, BlendMeta, BlendSettings, BlendShape
    from connectors.vllm.blend_worker import BlendWorker
    from index.hashing import Namespace

    ns = Namespace("missing", "float32", "test", 32)
    shape = BlendShape(ns, str(tmp_path / "missing"), ("l0",), 2, 32, 32, "float32")
    settings = BlendSettings(url=f"http://127.0.0.1:{free_port()}")
    worker = BlendWorker(settings, shape, "auto", {})
    cache = torch.zeros((4, 2, 32, 64))
    worker.register_kv_caches({"l0": cache})
    policy = {"policy": "first_k", "first_k": 4, "ratio": 0.1, "select_layer": 1}
    load = BlendLoad("r", tuple(range(65)), 64, (), (3, 1), policy)
    worker.start_load_kv(BlendMeta(loads=[load]))
    deadline = time.monotonic() + 30
    while (done := worker.get_finished()) is None:
        assert time.monotonic() < deadline, "a failed blend must still finish"
        time.sleep(0.01)
    worker.close()
    assert done == {"r"} and worker.take_load_errors() == {1, 3}
    assert worker.stats["failed_requests"] == 1 and not bool(cache.any())


def test_a_hung_service_costs_one_step_timeout_then_nothing(tmp_path: Path):
    """The chunk fetch runs inside the engine step: a service that hangs after the
    scheduler's lookup costs the first load one ``step_timeout_s``; the gate then fails
    the next loads without a call. Every claimed block is handed back to vLLM."""
    import signal
    import time

    import torch

    from connectors.vllm.blend_scheduler import BlendLoad, BlendMeta, BlendSettings, BlendShape
    from connectors.vllm.blend_worker import BlendWorker
    from index.hashing import Namespace

    svc = start_blend_service(tmp_path / "service")
    ns = Namespace("hung", "float32", "test", 32)
    shape = BlendShape(ns, str(tmp_path / "hung"), ("l0",), 2, 32, 32, "float32")
    worker = BlendWorker(BlendSettings(url=svc.url, step_timeout_s=0.3), shape, "auto", {})
    worker.register_kv_caches({"l0": torch.zeros((4, 2, 32, 64))})
    policy = {"policy": "first_k", "first_k": 4, "ratio": 0.1, "select_layer": 1}
    chunk = from_spans(list(range(65)), [(0, 64)], seed=1)
    spent = []
    try:
        worker._chunk_store()  # registered while healthy, as after earlier requests
        svc.proc.send_signal(signal.SIGSTOP)
        for i in range(3):
            load = BlendLoad(f"r{i}", tuple(range(65)), 64, tuple(chunk), (3, 1), policy)
            start = time.perf_counter()
            worker.start_load_kv(BlendMeta(loads=[load]))
            assert worker.get_finished() == {f"r{i}"}, "a failed load finishes in its step"
            spent.append(time.perf_counter() - start)
            assert worker.take_load_errors() == {1, 3}
    finally:
        svc.proc.send_signal(signal.SIGCONT)
        worker.close()
        svc.stop()
    assert 0.25 < spent[0] < 1.0, spent
    assert max(spent[1:]) < 0.005, spent
    assert worker.stats["failed_requests"] == 3 and worker.stats["blended_requests"] == 0


def test_lookup_never_blocks_the_step_loop(model, tmp_path: Path):
    """A hung service: each scheduler query returns within ~lookup_wait_s (None = ask again
    next step) and the lookup becomes a miss, claiming nothing, at lookup_timeout_s."""

    from vllm import SamplingParams
    from vllm.v1.request import Request

    from connectors.vllm.blend_scheduler import BlendScheduler, BlendSettings, BlendShape
    from index.hashing import Namespace

    svc = start_blend_service(tmp_path / "service")
    ns = Namespace(model.path, "float32", "test", 32)
    shape = BlendShape(ns, model.path, ("l0",), 2, 32, 32, "float32")
    side = BlendScheduler(BlendSettings(url=svc.url, lookup_timeout_s=0.4), shape)
    extra = {"kv_transfer_params": {"chunks": CHUNKS}}
    request = Request("r", PROMPT_B, SamplingParams(max_tokens=1, extra_args=extra), None)
    try:
        answers, elapsed = ask_while_stopped(side, request, svc.proc)
    finally:
        side.close()
        svc.stop()
    assert answers[0] == (None, False) and answers[-1] == (0, False)
    assert 0.3 < elapsed < 1.5, f"the miss came after {elapsed:.2f} s"
    assert side.get_num_new_matched_tokens(request, 0) == (0, False), "the miss is final"


def test_segments_cut_a_chunk_at_the_claim_and_end_fresh():
    import torch

    from connectors.blend.chunking import Chunk
    from connectors.blend.recompute import ChunkKV
    from connectors.vllm.blend_scheduler import BlendLoad
    from connectors.vllm.blend_worker import blend_segments

    tokens = tuple(range(100, 180))  # the whole chunk [10, 80) travels; the claim is 64
    held, missed = Chunk(10, 80, b"held"), Chunk(0, 5, b"missed")
    rows = torch.arange(70.0).view(70, 1, 1)
    kv = ChunkKV(torch.tensor(tokens[10:80]), 3, [rows], [-rows])
    load = BlendLoad("r", tokens, 64, (missed, held), (0, 1), {"policy": "none"})
    segs = blend_segments(load, {held.key: kv, missed.key: None})
    assert [s.cached is not None for s in segs] == [False, True, False]
    assert [s.tokens.tolist() for s in segs] == [list(tokens[:10]), list(tokens[10:64]), [164]]
    head = segs[1].cached
    assert head.start_pos == 3 and torch.equal(head.keys[0], rows[:54])
