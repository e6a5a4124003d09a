"""The trained llama2.c checkpoint in the shared dir, rewritten as an HF Llama directory that
vLLM can serve, so blend quality is measured on a model that has learned real text.

llama2.c rotates GPT-J pairs (x[2i], x[2i+1]); HF Llama and vLLM rotate halves (x[i],
x[i + d/2]). Permuting each head's rows of wq and wk to [even dims, odd dims] makes the two
identical: q.k is unchanged by a permutation applied to both, and the pairs line up with the
halves.

vLLM's CPU attention has no kernel for the checkpoint's head size 16, so each head is widened
to 32 without changing the function: NeoX pair i of a 32-wide head turns at frequency
``base^(-2i/32)``, so the 16-wide head's pair i (frequency ``base^(-2i/16)``) moves to pair 2i
and the odd pairs stay zero in q and k (adding nothing to q.k); q is scaled by sqrt(2) so
that q.k / sqrt(32) equals the original q.k / sqrt(16); v gains zero dims that o_proj ignores.
vLLM runs without a tokenizer (token ids in, token ids out); connectors.blend.llama2c's
Tokenizer encodes the prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from connectors.blend import llama2c

WIDE = 32


def _qk(w: torch.Tensor, heads: int, d: int, scale: float = 1.0) -> torch.Tensor:
    """Rows of wq / wk: GPT-J pair i of each d-wide head to NeoX pair 2i of a WIDE head."""
    old = w.view(heads, d, -1)
    new = w.new_zeros((heads, WIDE, w.shape[-1]))
    i = torch.arange(d // 2)
    new[:, 2 * i] = old[:, 2 * i] * scale  # first element of each pair: first half
    new[:, 2 * i + WIDE // 2] = old[:, 2 * i + 1] * scale
    return new.reshape(heads * WIDE, -1)


def _pad_rows(w: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    new = w.new_zeros((heads, WIDE, w.shape[-1]))
    new[:, :d] = w.view(heads, d, -1)
    return new.reshape(heads * WIDE, -1)


def convert(out: Path, root: Path | None = None) -> Path:
    """Write ``out/config.json`` and ``out/model.safetensors``; returns ``out``."""
    assert 2 * llama2c.load(root).model.cfg.head_dim == WIDE, "widening doubles the head"
    model = llama2c.load(root).model
    c = model.cfg
    t = {"model.embed_tokens.weight": model.emb, "model.norm.weight": model.norm}
    for i, layer in enumerate(model.layers):
        w, p = layer.w, f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = w["rms_att"]
        scale = (WIDE / c.head_dim) ** 0.5
        t[p + "self_attn.q_proj.weight"] = _qk(w["wq"], c.n_heads, c.head_dim, scale)
        t[p + "self_attn.k_proj.weight"] = _qk(w["wk"], c.n_kv_heads, c.head_dim)
        t[p + "self_attn.v_proj.weight"] = _pad_rows(w["wv"], c.n_kv_heads, c.head_dim)
        t[p + "self_attn.o_proj.weight"] = _pad_rows(w["wo"].T, c.n_heads, c.head_dim).T
        t[p + "post_attention_layernorm.weight"] = w["rms_ffn"]
        t[p + "mlp.gate_proj.weight"] = w["gate"]
        t[p + "mlp.up_proj.weight"] = w["up"]
        t[p + "mlp.down_proj.weight"] = w["down"]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in t.items()}, str(out / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": WIDE,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": llama2c.BOS,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
