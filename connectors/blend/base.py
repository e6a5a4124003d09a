"""The layer-callable contract blended prefill runs on, and a reference forward over it.

A model is exposed as per-layer callables on a single sequence (no batch dim):

- ``embed(tokens [T]) -> h [T, D]``
- ``layers[i].qkv(h [T, D], positions [T]) -> QKV(q [T, Hq, d], k [T, Hkv, d], v [T, Hkv, d])``
  with RoPE already applied to q and k at ``positions``.
- ``layers[i].attend_and_mlp(h [Tq, D], q [Tq, Hq, d], k_all [Tk, Hkv, d], v_all [Tk, Hkv, d],
  mask [Tq, Tk] bool, True = may attend) -> h' [Tq, D]``: attention, output projection,
  residuals and MLP for the query rows only. The rows of ``k_all`` need not come from the same
  pass as ``h``: that is what lets cached and recomputed KV be spliced together.
- ``final(h [T, D]) -> logits [T, V]``.

Every callable is pure: it returns new tensors and mutates neither its inputs nor the model.
Nothing here knows about a particular engine or checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from connectors.blend.rope import RopeSpec


class QKV(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


class BlendLayer(ABC):
    @abstractmethod
    def qkv(self, h: torch.Tensor, positions: torch.Tensor) -> QKV: ...

    @abstractmethod
    def attend_and_mlp(
        self,
        h: torch.Tensor,
        q: torch.Tensor,
        k_all: torch.Tensor,
        v_all: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor: ...


class BlendModel(ABC):
    rope: RopeSpec
    layers: Sequence[BlendLayer]

    @abstractmethod
    def embed(self, tokens: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def final(self, h: torch.Tensor) -> torch.Tensor: ...

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class KV:
    """Per-layer keys/values of consecutive tokens at ``positions`` (keys RoPE-rotated there)."""

    keys: list[torch.Tensor]  # num_layers x [T, Hkv, d]
    values: list[torch.Tensor]
    positions: torch.Tensor  # [T] int64

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def __post_init__(self) -> None:
        assert len(self.keys) == len(self.values), "one key and one value tensor per layer"
        for k, v in zip(self.keys, self.values, strict=True):
            assert k.shape[0] == v.shape[0] == self.num_tokens, "rows must match positions"

    def slice(self, start: int, end: int) -> KV:
        return KV(
            [k[start:end] for k in self.keys],
            [v[start:end] for v in self.values],
            self.positions[start:end],
        )


class ForwardResult(NamedTuple):
    logits: torch.Tensor  # [T_new, V]
    kv: KV  # past + new tokens


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    return k_pos[None, :] <= q_pos[:, None]


def forward(
    model: BlendModel, tokens: torch.Tensor, past: KV | None = None, start: int | None = None
) -> ForwardResult:
    """Exact causal forward of ``tokens`` after ``past`` (full prefill when past is None, one
    decode step when tokens has one row). Positions continue from ``start`` (default: right
    after ``past``, or 0)."""
    if start is None:
        start = 0 if past is None else int(past.positions[-1]) + 1
    pos = torch.arange(start, start + tokens.shape[0], dtype=torch.int64)
    h = model.embed(tokens)
    keys, values = [], []
    k_pos = pos if past is None else torch.cat((past.positions, pos))
    mask = causal_mask(pos, k_pos)
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h, pos)
        if past is not None:
            k = torch.cat((past.keys[i], k))
            v = torch.cat((past.values[i], v))
        h = layer.attend_and_mlp(h, q, k, v, mask)
        keys.append(k)
        values.append(v)
    return ForwardResult(model.final(h), KV(keys, values, k_pos))


def greedy(model: BlendModel, last_logits: torch.Tensor, kv: KV, steps: int) -> list[int]:
    """Greedy continuation from a prefilled cache: the token after ``last_logits`` and onward."""
    out: list[int] = []
    logits = last_logits
    for _ in range(steps):
        tok = int(torch.argmax(logits))
        out.append(tok)
        res = forward(model, torch.tensor([tok]), kv)
        logits, kv = res.logits[-1], res.kv
    return out
