"""An HF Llama checkpoint directory (config.json + safetensors) as a BlendModel.

The directory is the one vLLM serves, so the blend connector recomputes with the very weights
the engine runs. Llama = RMSNorm, NeoX-half RoPE (``rotate_half``) with ``rope_theta``, grouped
query attention, SwiGLU MLP, optionally tied embeddings. Only plain RoPE is supported: a
checkpoint with RoPE scaling, attention biases or a sliding window is refused, since its keys
would not be what this module computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cacheservice.errors import BadRequest
from connectors.blend.llama import Llama, LlamaShape
from connectors.blend.rope import RopeSpec

_PER_LAYER = {
    "rms_att": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "rms_ffn": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise BadRequest(f"RoPE type {kind!r} is unsupported by hf_llama: use plain RoPE models")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


class HFLlama(Llama):
    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        root = Path(path)
        if not (root / "config.json").is_file():
            raise BadRequest(f"{root} has no config.json: give an HF Llama checkpoint directory")
        cfg = json.loads((root / "config.json").read_text())
        if cfg.get("model_type") != "llama":
            raise BadRequest(f"{root} holds a {cfg.get('model_type')!r} model, not 'llama'")
        if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("sliding_window"):
            raise BadRequest(f"{root}: biases and sliding windows are unsupported by hf_llama")
        theta = _rope_theta(cfg)
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise BadRequest(f"{root} has no *.safetensors weights")
        t: dict[str, torch.Tensor] = {}
        for f in files:
            t.update(load_file(str(f)))
        t = {k.removeprefix("model."): v.to(dtype) for k, v in t.items()}
        n_heads = int(cfg["num_attention_heads"])
        n_kv_heads = int(cfg.get("num_key_value_heads") or n_heads)
        self.head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads)
        rope = RopeSpec(self.head_dim, theta, "neox")
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        shape = LlamaShape(n_heads, n_kv_heads, self.head_dim, eps, rope)
        layers = [
            {k: t[f"layers.{i}.{n}"] for k, n in _PER_LAYER.items()}
            for i in range(int(cfg["num_hidden_layers"]))
        ]
        emb = t["embed_tokens.weight"]
        super().__init__(emb, layers, t["norm.weight"], t.get("lm_head.weight", emb), shape)
