"""The Llama block on the layer-callable contract, shared by every Llama-family loader.

RMSNorm, RoPE (GPT-J pair or NeoX half, per ``RopeSpec``), grouped-query attention, SwiGLU MLP,
optionally tied embeddings. Loaders (llama2c.py, hf_llama.py) only map their checkpoint's
weights onto these names: per layer ``rms_att, wq, wk, wv, wo, rms_ffn, gate, up, down``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from connectors.blend.attention import gqa_attention
from connectors.blend.base import QKV, BlendLayer, BlendModel
from connectors.blend.rope import RopeSpec, apply_rope

LAYER_WEIGHTS = ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "gate", "up", "down")


@dataclass(frozen=True)
class LlamaShape:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    rope: RopeSpec


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # half precision is normalised in float32, as HF does; float32/64 stay as they are
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class LlamaLayer(BlendLayer):
    def __init__(self, w: dict[str, torch.Tensor], shape: LlamaShape):
        missing = set(LAYER_WEIGHTS) - w.keys()
        assert not missing, f"layer weights missing: {sorted(missing)}"
        self.w, self.s = w, shape

    def qkv(self, h: torch.Tensor, positions: torch.Tensor) -> QKV:
        s, w = self.s, self.w
        x = rmsnorm(h, w["rms_att"], s.eps)
        q = (x @ w["wq"].T).view(-1, s.n_heads, s.head_dim)
        k = (x @ w["wk"].T).view(-1, s.n_kv_heads, s.head_dim)
        v = (x @ w["wv"].T).view(-1, s.n_kv_heads, s.head_dim)
        return QKV(apply_rope(q, positions, s.rope), apply_rope(k, positions, s.rope), v)

    def attend_and_mlp(self, h, q, k_all, v_all, mask):
        s, w = self.s, self.w
        att = gqa_attention(q, k_all, v_all, mask, s.head_dim**-0.5)
        h = h + att.reshape(h.shape[0], -1) @ w["wo"].T
        x = rmsnorm(h, w["rms_ffn"], s.eps)
        return h + (F.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


class Llama(BlendModel):
    """Embedding, ``layers`` and the final norm + classifier (``lm_head`` may be ``emb``)."""

    def __init__(
        self,
        emb: torch.Tensor,
        layer_weights: list[dict[str, torch.Tensor]],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        shape: LlamaShape,
    ):
        self.emb, self.norm, self.lm_head, self.shape = emb, norm, lm_head, shape
        self.rope = shape.rope
        self.layers = [LlamaLayer(w, shape) for w in layer_weights]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.emb[tokens.to(self.emb.device)]

    def final(self, h: torch.Tensor) -> torch.Tensor:
        return rmsnorm(h, self.norm, self.shape.eps) @ self.lm_head.T
