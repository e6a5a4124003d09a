"""hf_llama against HF transformers' own LlamaForCausalLM on tiny random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cacheservice.errors import BadRequest
from connectors.blend.base import forward
from connectors.blend.hf_llama import HFLlama
from tests.connectors.vllm.tiny_model import make_tiny_llama


@pytest.fixture(scope="module", params=[(2, 2), (4, 2)], ids=["mha", "gqa"])
def tiny_dir(request, tmp_path_factory):
    heads, kv_heads = request.param
    path = tmp_path_factory.mktemp(f"hf_{heads}_{kv_heads}")
    return make_tiny_llama(str(path), heads=heads, kv_heads=kv_heads).path


def hf_forward(path: str, tokens: torch.Tensor):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(tokens[None], use_cache=True)
    return out.logits[0], out.past_key_values


def test_logits_and_kv_match_transformers(tiny_dir):
    tokens = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_cache = hf_forward(tiny_dir, tokens)
    res = forward(HFLlama(tiny_dir), tokens)
    torch.testing.assert_close(res.logits, ref_logits, rtol=1e-4, atol=1e-4)
    for i, (k, v) in enumerate(zip(res.kv.keys, res.kv.values, strict=True)):
        layer = ref_cache.layers[i]  # HF caches [batch, kv_heads, T, d], keys post-RoPE
        torch.testing.assert_close(k, layer.keys[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, layer.values[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_rejects_what_it_cannot_compute(tiny_dir, tmp_path):
    with pytest.raises(BadRequest, match="config.json"):
        HFLlama(tmp_path)
    cfg = json.loads((Path(tiny_dir) / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadRequest, match="yarn"):
        HFLlama(tmp_path)


def test_converted_llama2c_matches_the_original(tmp_path):
    """The trained llama2.c checkpoint rewritten as a widened HF Llama (the model the vLLM blend
    tests serve) computes the same logits as connectors.blend.llama2c."""
    from connectors.blend import llama2c
    from tests.connectors.vllm.llama2c_hf import convert

    root = llama2c.shared_dir()
    assert root is not None, "the llama2.c model ships in tests/assets/models"
    model, tok = llama2c.load(root)
    hf = HFLlama(convert(tmp_path / "hf", root))
    assert hf.head_dim == 32 and hf.rope.layout == "neox"
    tokens = torch.tensor(tok.encode("the quiet river of numbers flows", bos=True))
    want, got = forward(model, tokens).logits, forward(hf, tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
