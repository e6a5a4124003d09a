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
import torch.nn.functional as F
from safetensors.torch import load_file

from cacheservice.errors import BadRequest
from connectors.blend.base import QKV, BlendLayer, BlendModel
from connectors.blend.rope import RopeSpec, apply_rope

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


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # HF normalises in float32 whatever the weights' dtype
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class HFLlamaLayer(BlendLayer):
    def __init__(self, w: dict[str, torch.Tensor], model: HFLlama):
        self.w, self.m = w, model

    def qkv(self, h: torch.Tensor, positions: torch.Tensor) -> QKV:
        m, w = self.m, self.w
        x = _rmsnorm(h, w["rms_att"], m.eps)
        q = (x @ w["wq"].T).view(-1, m.n_heads, m.head_dim)
        k = (x @ w["wk"].T).view(-1, m.n_kv_heads, m.head_dim)
        v = (x @ w["wv"].T).view(-1, m.n_kv_heads, m.head_dim)
        return QKV(apply_rope(q, positions, m.rope), apply_rope(k, positions, m.rope), v)

    def attend_and_mlp(self, h, q, k_all, v_all, mask):
        m, w = self.m, self.w
        rep = m.n_heads // m.n_kv_heads
        k = k_all.repeat_interleave(rep, dim=1).transpose(0, 1)  # [H, Tk, d]
        v = v_all.repeat_interleave(rep, dim=1).transpose(0, 1)
        att = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask[None])
        h = h + att.transpose(0, 1).reshape(h.shape[0], -1) @ w["wo"].T
        x = _rmsnorm(h, w["rms_ffn"], m.eps)
        return h + (F.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


class HFLlama(BlendModel):
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
        self.n_heads = int(cfg["num_attention_heads"])
        self.n_kv_heads = int(cfg.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // self.n_heads)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.rope = RopeSpec(self.head_dim, theta, "neox")
        self.emb, self.norm = t["embed_tokens.weight"], t["norm.weight"]
        self.lm_head = t.get("lm_head.weight", self.emb)
        L = int(cfg["num_hidden_layers"])
        self.layers = [
            HFLlamaLayer({k: t[f"layers.{i}.{n}"] for k, n in _PER_LAYER.items()}, self)
            for i in range(L)
        ]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.emb[tokens]

    def final(self, h: torch.Tensor) -> torch.Tensor:
        return _rmsnorm(h, self.norm, self.eps) @ self.lm_head.T
