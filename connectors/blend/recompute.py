"""Blended prefill: reuse cached chunk KV at new positions, recompute a selected few tokens.

A prompt is a list of segments. A fresh segment (BOS, instructions, the question) is always
computed. A cached segment brings its per-layer K/V computed at a canonical start position;
its keys are re-rotated to where the chunk now sits. Reused KV lacks cross-chunk attention
(a chunk never saw the chunks before it), so some chunk tokens are recomputed:

- ``FirstK(k)``: the first k tokens of each chunk (EPIC / LegoLink): they absorb the
  attention-sink role the chunk's start had when it was encoded alone.
- ``TopRatio(r, layer)``: CacheBlend. Layers below ``layer`` run on every token; at ``layer``
  fresh K/V of every token are compared with the cached ones and the r fraction of chunk
  tokens that deviate most are kept; later layers run on those plus the fresh tokens only.

In every layer the recomputed rows' K/V overwrite the cached rows (splice), so later tokens
attend to the corrected values. Nothing here depends on a particular model or engine.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from cacheservice.errors import BadRequest
from connectors.blend.base import KV, BlendModel, causal_mask, forward
from connectors.blend.rope import rerotate


@dataclass(frozen=True)
class ChunkKV:
    """A chunk's KV as computed once, with ``tokens[0]`` at position ``start_pos``."""

    tokens: torch.Tensor  # [n] int64
    start_pos: int
    keys: list[torch.Tensor]  # num_layers x [n, Hkv, d], rotated at start_pos + i
    values: list[torch.Tensor]

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        assert all(k.shape[0] == n for k in self.keys), "one key row per chunk token"

    def head(self, n: int) -> ChunkKV:
        """The first ``n`` tokens' KV (views, no copy)."""
        if n >= self.tokens.shape[0]:
            return self
        keys, values = [k[:n] for k in self.keys], [v[:n] for v in self.values]
        return ChunkKV(self.tokens[:n], self.start_pos, keys, values)


def encode_chunk(
    model: BlendModel, tokens: torch.Tensor, prefix: torch.Tensor | None = None
) -> ChunkKV:
    """Compute a chunk's KV alone, after ``prefix`` (e.g. BOS, so the chunk does not become its
    own attention sink); the chunk's canonical start is ``len(prefix)``."""
    n0 = 0 if prefix is None else int(prefix.shape[0])
    full = tokens if prefix is None else torch.cat((prefix, tokens))
    kv = forward(model, full).kv.slice(n0, n0 + tokens.shape[0])
    return ChunkKV(tokens.clone(), n0, [k.clone() for k in kv.keys], [v.clone() for v in kv.values])


@dataclass(frozen=True)
class Segment:
    tokens: torch.Tensor
    cached: ChunkKV | None = None  # None: fresh tokens, always computed

    def __post_init__(self) -> None:
        if self.cached is not None and not torch.equal(self.cached.tokens, self.tokens):
            raise BadRequest("cached chunk KV belongs to different tokens: look it up by key")


class Deviants(NamedTuple):
    """Every prompt token's freshly computed K/V at the selection layer, and the cached
    (re-rotated) ones; rows of fresh tokens hold placeholders in ``cached_*``."""

    k: torch.Tensor
    v: torch.Tensor
    cached_k: torch.Tensor
    cached_v: torch.Tensor


class Policy(ABC):
    """Chooses which chunk tokens to recompute. Fresh tokens are always recomputed."""

    select_layer: int | None = None  # layer where select() runs; None = initial() only

    @abstractmethod
    def initial(self, chunk_offset: torch.Tensor) -> torch.Tensor:
        """``chunk_offset`` [T]: index within its chunk, -1 for fresh tokens -> bool [T]."""

    def select(self, fresh: Deviants, is_chunk: torch.Tensor) -> torch.Tensor:
        """At ``select_layer``: fresh vs cached K/V of every token -> chunk tokens to keep."""
        raise NotImplementedError("static policies select nothing at a layer")


@dataclass(frozen=True)
class NoRecompute(Policy):
    def initial(self, chunk_offset: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(chunk_offset, dtype=torch.bool)


@dataclass(frozen=True)
class FirstK(Policy):
    k: int

    def initial(self, chunk_offset: torch.Tensor) -> torch.Tensor:
        return (chunk_offset >= 0) & (chunk_offset < self.k)


@dataclass(frozen=True)
class TopRatio(Policy):
    ratio: float
    select_layer: int = 1
    by: str = "kv"  # "k", "v" or "kv": which deviation ranks the tokens

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0 or self.by not in ("k", "v", "kv"):
            raise BadRequest("TopRatio needs 0 <= ratio <= 1 and by in ('k', 'v', 'kv')")

    def initial(self, chunk_offset: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(chunk_offset, dtype=torch.bool)

    def select(self, fresh: Deviants, is_chunk: torch.Tensor) -> torch.Tensor:
        dev = torch.zeros(is_chunk.shape[0], dtype=torch.float64)
        if self.by in ("k", "kv"):
            dev += _deviation(fresh.k, fresh.cached_k).cpu()
        if self.by in ("v", "kv"):
            dev += _deviation(fresh.v, fresh.cached_v).cpu()
        n = math.ceil(self.ratio * int(is_chunk.sum()))
        dev = dev.masked_fill(~is_chunk, float("-inf"))
        out = torch.zeros_like(is_chunk)
        out[torch.topk(dev, n).indices] = True
        return out


def _deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    # relative L2 per token over heads, so K and V deviations are comparable when summed
    diff = (fresh - cached).flatten(1).double().norm(dim=1)
    return diff / cached.flatten(1).double().norm(dim=1).clamp_min(1e-12)


def _cached_rows(
    model: BlendModel, segments: Sequence[Segment], start: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer [T, Hkv, d] keys (re-rotated to their new positions) and values of the cached
    chunks; fresh rows are zero placeholders that recompute always overwrites."""
    ref = next(s.cached for s in segments if s.cached is not None)
    keys, values = [], []
    for i in range(model.num_layers):
        ks, vs, at = [], [], start
        for s in segments:
            n = s.tokens.shape[0]
            if s.cached is None:
                blank = ref.keys[i].new_zeros((n, *ref.keys[i].shape[1:]))
                ks.append(blank)
                vs.append(blank)
            else:
                ks.append(rerotate(s.cached.keys[i], s.cached.start_pos, at, model.rope))
                vs.append(s.cached.values[i])
            at += n
        keys.append(torch.cat(ks))
        values.append(torch.cat(vs))
    return keys, values


@dataclass(frozen=True)
class BlendResult:
    # [len(rows), V]: logits of the rows computed through the last layer; None when not asked
    logits: torch.Tensor | None
    rows: torch.Tensor  # [R] prompt indices of those rows (fresh rows always among them)
    kv: KV  # final per-layer KV of the whole prompt, recomputed rows spliced in
    recomputed: torch.Tensor  # [T] bool: rows computed through the last layer
    recompute_fraction: float  # recomputed chunk tokens / chunk tokens
    layer_fraction: float  # chunk (token, layer) qkv evaluations / (chunk tokens * layers)

    @property
    def last_logits(self) -> torch.Tensor:
        assert self.logits is not None, "blend_prefill(logits=False) computes no logits"
        return self.logits[-1]


def blend_prefill(
    model: BlendModel,
    segments: Sequence[Segment],
    policy: Policy,
    start: int = 0,
    logits: bool = True,
) -> BlendResult:
    """Prefill the concatenated segments at positions ``start..``, reusing cached chunks.
    ``logits`` False: the KV only (an engine computes the next token itself), which skips the
    last layer's attention + MLP and the classifier, unused by the KV."""
    if not segments or segments[-1].cached is not None:
        raise BadRequest("a blended prompt must end with a fresh segment (e.g. the question)")
    L = model.num_layers
    sel_layer = policy.select_layer
    if sel_layer is not None and not 0 <= sel_layer < L:
        raise BadRequest(f"select_layer {sel_layer} out of range for {L} layers")
    tokens = torch.cat([s.tokens for s in segments])
    T = tokens.shape[0]
    pos = torch.arange(start, start + T, dtype=torch.int64)
    offset = torch.full((T,), -1, dtype=torch.int64)
    at = 0
    for s in segments:
        n = s.tokens.shape[0]
        if s.cached is not None:
            offset[at : at + n] = torch.arange(n)
        at += n
    is_chunk = offset >= 0
    n_chunk = int(is_chunk.sum())
    if n_chunk == 0:
        res = forward(model, tokens, start=start)
        every = torch.ones(T, dtype=torch.bool)
        return BlendResult(res.logits, torch.arange(T), res.kv, every, 0.0, 0.0)
    cached_k, cached_v = _cached_rows(model, segments, start)
    active = ~is_chunk | policy.initial(offset)
    h = model.embed(tokens[active])
    keys, values, evaluated = [], [], 0
    # the active rows change only at the selection layer: their mask is built once per set
    rows = active.nonzero().squeeze(1)
    mask, n_active_chunk = causal_mask(pos[rows], pos), int((active & is_chunk).sum())
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h, pos[rows])
        evaluated += n_active_chunk
        # in the model's compute dtype: the stored KV may be the engine's (bf16)
        K, V = cached_k[i].to(k.dtype), cached_v[i].to(v.dtype)
        K = K.clone() if K is cached_k[i] else K
        V = V.clone() if V is cached_v[i] else V
        K[rows], V[rows] = k, v
        if i == sel_layer:
            assert bool(active.all()), "selection needs every token's fresh K/V at its layer"
            picked = policy.select(Deviants(k, v, cached_k[i], cached_v[i]), is_chunk)
            active = ~is_chunk | picked
            h, q = h[active], q[active]
            rows = active.nonzero().squeeze(1)
            mask, n_active_chunk = causal_mask(pos[rows], pos), int((active & is_chunk).sum())
        if logits or i < L - 1:
            h = layer.attend_and_mlp(h, q, K, V, mask)
        keys.append(K)
        values.append(V)
    return BlendResult(
        logits=model.final(h) if logits else None,
        rows=rows,
        kv=KV(keys, values, pos),
        recomputed=active,
        recompute_fraction=n_active_chunk / max(n_chunk, 1),
        layer_fraction=evaluated / max(n_chunk * L, 1),
    )
