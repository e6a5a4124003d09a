"""The model vLLM already serves, on the blend layer-callable contract: no second copy.

A KV connector's worker side is handed the KV caches, never the model. It can still reach the
model: every attention layer vLLM registers in ``compilation_config.static_forward_context``
is the very ``Attention`` submodule of the loaded model, under its module path (e.g.
``model.layers.3.self_attn.attn``). ``served_model`` finds the root module that holds them
all, once, at ``register_kv_caches``: first among its callers' locals (vLLM's model runner
calls it and holds the model as ``self.model``), else by walking up from that submodule
through every live module's children (a heap scan, ~2 s in a vLLM process). Either way the
root is accepted only when every registered layer is its submodule under that very name.

Blended prefill then runs the engine's own modules: the embedding, each decoder layer's
``input_layernorm``, ``qkv_proj`` (biases included), ``rotary_emb`` (vLLM's own RoPE kernel),
``o_proj``, ``post_attention_layernorm`` and ``mlp``, the final ``norm`` and ``lm_head``. On
CPU vLLM replaces the linear weights by packed oneDNN handles and frees the originals, so
calling the modules is also the only way to use those weights at all. Only the attention
itself is computed here (SDPA over spliced cached + recomputed K/V with an explicit mask):
vLLM's attention reads its paged cache and forward context, which a blend must not touch.

A decoder layer is accepted when it has exactly the Llama block's parts and its RoPE is the
plain ``RotaryEmbedding`` (re-rotation of cached keys assumes it): Llama, Mistral without a
sliding window, Qwen2 (qkv bias). Anything else (scaled RoPE, q/k norms, sliding windows,
tensor parallelism) raises ``Unsupported``, so the connector claims nothing rather than
blending wrong KV.
"""

from __future__ import annotations

import gc
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from connectors.blend.attention import gqa_attention
from connectors.blend.base import QKV, BlendLayer, BlendModel
from connectors.blend.rope import RopeSpec

_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTN_PARTS = ("qkv_proj", "o_proj", "rotary_emb", "attn")


class Unsupported(Exception):
    """The served model is not one blended prefill can compute exactly."""


def _parents() -> dict[int, torch.nn.Module]:
    """Child module id -> its parent, over every live module in the process."""
    frozen = gc.get_freeze_count() > 0
    if frozen:  # vLLM freezes its start-up heap, which hides it from get_objects
        gc.unfreeze()
    try:
        objs = gc.get_objects()
    finally:
        if frozen:
            gc.freeze()
    out: dict[int, torch.nn.Module] = {}
    module = torch.nn.Module
    for obj in objs:
        # type(), not isinstance(): lazy proxies answer __class__ with deprecation warnings
        if issubclass(type(obj), module):
            for child in obj._modules.values():
                if child is not None:
                    out[id(child)] = obj
    return out


def _misplaced(root: torch.nn.Module, attention: dict[str, torch.nn.Module]) -> str | None:
    """The first layer name under which ``root`` does not hold that very layer, or None."""
    for name, layer in attention.items():
        try:
            if root.get_submodule(name) is not layer:
                return name
        except AttributeError:
            return name
    return None


def _holds(root: object, attention: dict[str, torch.nn.Module]) -> bool:
    return issubclass(type(root), torch.nn.Module) and _misplaced(root, attention) is None


def _from_callers(attention: dict[str, torch.nn.Module], depth: int = 32):
    """The model from the frames that called us: vLLM's model runner calls
    ``register_kv_caches`` with the model as its ``self.model``. A look at a few frames'
    locals instead of a scan of the whole heap (~2 s in a vLLM process)."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        for value in list(frame.f_locals.values()):
            for root in (value, _attr(value, "model")):
                if root is not None and _holds(root, attention):
                    return root
        frame = frame.f_back
    return None


def _attr(obj: object, name: str) -> object:
    try:  # an instance attribute only: no property or __getattr__ of an arbitrary object runs
        return object.__getattribute__(obj, "__dict__").get(name)
    except (AttributeError, TypeError):
        return None


class Found(NamedTuple):
    root: torch.nn.Module
    via: str  # "caller": a caller's locals held it; "heap": the scan of every live module


def served_model(attention: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """The root module that holds every ``attention`` layer at its name's module path."""
    return find_model(attention).root


def find_model(attention: dict[str, torch.nn.Module]) -> Found:
    if not attention:
        raise Unsupported("no attention layers registered")
    found = _from_callers(attention)
    if found is not None:
        return Found(found, "caller")
    name, leaf = next(iter(attention.items()))
    parents = _parents()
    node = leaf
    for _ in name.split("."):
        if id(node) not in parents:
            raise Unsupported(f"{name}: no module holds this attention layer")
        node = parents[id(node)]
    if (n := _misplaced(node, attention)) is not None:
        raise Unsupported(f"{n} is not the registered attention layer of {type(node)}")
    return Found(node, "heap")


def _out(x: torch.Tensor | tuple) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x  # vLLM linears return (out, bias)


class EngineLayer(BlendLayer):
    def __init__(self, layer: torch.nn.Module, name: str):
        missing = [p for p in _LAYER_PARTS if not hasattr(layer, p)]
        attn = getattr(layer, "self_attn", None)
        missing += [f"self_attn.{p}" for p in _ATTN_PARTS if not hasattr(attn, p)]
        if missing:
            raise Unsupported(f"{name} ({type(layer).__name__}) lacks {missing}")
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise Unsupported(f"{name}: q/k norms are not computed by blended prefill")
        rope = attn.rotary_emb
        if type(rope).__name__ != "RotaryEmbedding":
            raise Unsupported(f"{name}: {type(rope).__name__} is not plain RoPE")
        inner = attn.attn
        if getattr(inner, "sliding_window", None) or getattr(attn, "sliding_window", None):
            raise Unsupported(f"{name}: a sliding window is not computed by blended prefill")
        self.m, self.a = layer, attn
        self.n_heads, self.n_kv = int(attn.num_heads), int(attn.num_kv_heads)
        if getattr(attn, "total_num_heads", self.n_heads) != self.n_heads:
            raise Unsupported(f"{name}: tensor-parallel shards are not supported")
        self.head_dim = int(attn.head_dim)
        self.scale = float(getattr(inner, "scale", self.head_dim**-0.5))
        self.rope = RopeSpec(self.head_dim, float(rope.base), "neox" if rope.is_neox_style
                             else "gptj", int(rope.rotary_dim))  # fmt: skip

    def qkv(self, h: torch.Tensor, positions: torch.Tensor) -> QKV:
        a = self.a
        positions = positions.to(h.device)  # blend_prefill keeps its bookkeeping on the host
        qkv = _out(a.qkv_proj(self.m.input_layernorm(h)))
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        # vLLM's rotary kernel rotates in place: hand it copies the caller may keep
        q, k = q.contiguous(), k.contiguous()
        q, k = a.rotary_emb(positions, q, k)
        d, n_kv = self.head_dim, self.n_kv
        return QKV(q.view(-1, self.n_heads, d), k.view(-1, n_kv, d), v.reshape(-1, n_kv, d))

    def attend_and_mlp(self, h, q, k_all, v_all, mask):
        att = gqa_attention(q, k_all, v_all, mask, self.scale)
        h = h + _out(self.a.o_proj(att.reshape(h.shape[0], -1)))
        return h + self.m.mlp(self.m.post_attention_layernorm(h))


class EngineModel(BlendModel):
    """``root`` is the module vLLM runs (``...ForCausalLM``); ``names`` its attention layers in
    KV-cache order, which is the decoder layers' order."""

    def __init__(self, root: torch.nn.Module, names: list[str]):
        inner = getattr(root, "model", None)
        for part in ("embed_tokens", "layers", "norm"):
            if not hasattr(inner, part):
                raise Unsupported(f"{type(root).__name__}.model has no {part}")
        self.inner, self.root = inner, root
        layers = [n.removesuffix(".self_attn.attn") for n in names]
        if any(n == m for n, m in zip(layers, names, strict=True)):
            raise Unsupported(f"attention layers not at <layer>.self_attn.attn: {names[:2]}")
        self.layers = [EngineLayer(root.get_submodule(n), n) for n in layers]
        specs = {layer.rope for layer in self.layers}
        if len(specs) != 1:
            raise Unsupported(f"layers use different RoPE: {sorted(map(str, specs))}")
        self.rope = specs.pop()
        # tied embeddings share the embedding's parameter (vLLM ties by assigning it)
        self._lm_head = getattr(getattr(root, "lm_head", None), "weight", None)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = getattr(self.inner.embed_tokens, "weight", None)
        return self.inner.embed_tokens(tokens if weight is None else tokens.to(weight.device))

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """Logits, for references and quality checks: a blend in the engine asks for the KV only
        (``blend_prefill(logits=False)``), vLLM computes the next token."""
        if self._lm_head is None or self._lm_head.numel() == 0:
            raise Unsupported(f"{type(self.root).__name__}.lm_head has no readable weight")
        return F.linear(self.inner.norm(h), self._lm_head)
