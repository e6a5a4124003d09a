"""Rotary position embedding (RoPE) and exact re-rotation of stored keys.

RoPE rotates each 2-D pair of a key by ``pos * inv_freq[i]``. Rotations compose, so a key
stored at canonical position p moves to position q by one more rotation of ``q - p``; values
carry no position and are never touched. Two pair layouts exist:

- ``gptj``: pairs are adjacent dims (x[2i], x[2i+1]) — llama2.c, GPT-J, Meta's original Llama.
- ``neox``: pairs are the two halves (x[i], x[i + d/2]) — HF Llama, vLLM's default, GPT-NeoX.

Angles are computed in float64 and the rotation runs in float64, so a re-rotated key equals a
freshly rotated one to the precision of the stored dtype even at large positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cacheservice.errors import BadRequest

LAYOUTS = ("gptj", "neox")


@dataclass(frozen=True)
class RopeSpec:
    head_dim: int
    base: float = 10000.0
    layout: str = "neox"
    rotary_dim: int | None = None  # partial rotary (e.g. GPT-NeoX 25%); None = whole head

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise BadRequest(f"RoPE layout {self.layout!r} unknown: use one of {LAYOUTS}")
        rot = self.rot_dim
        if rot <= 0 or rot % 2 or rot > self.head_dim:
            raise BadRequest(f"rotary_dim {rot} must be even and in (0, head_dim={self.head_dim}]")

    @property
    def rot_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def inv_freq(self) -> torch.Tensor:
        i = torch.arange(0, self.rot_dim, 2, dtype=torch.float64)
        return 1.0 / (self.base ** (i / self.rot_dim))


def _angles(spec: RopeSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv = spec.inv_freq().to(positions.device)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # [T, rot/2]
    return ang.cos()[:, None, :], ang.sin()[:, None, :]  # broadcast over heads


def apply_rope(x: torch.Tensor, positions: torch.Tensor | int, spec: RopeSpec) -> torch.Tensor:
    """Rotate ``x`` [T, H, head_dim] to ``positions`` ([T] ints, or one int for every row).

    Returns a new tensor in x's dtype; ``x`` is not modified."""
    if x.dim() != 3 or x.shape[-1] != spec.head_dim:
        raise BadRequest(f"expected [tokens, heads, {spec.head_dim}], got {tuple(x.shape)}")
    if isinstance(positions, int):
        positions = torch.full((x.shape[0],), positions, dtype=torch.int64)
    if positions.shape != (x.shape[0],):
        raise BadRequest(f"positions must have shape [{x.shape[0]}], got {tuple(positions.shape)}")
    cos, sin = _angles(spec, positions.to(x.device))
    rot = spec.rot_dim
    xd = x.to(torch.float64)
    part, rest = xd[..., :rot], xd[..., rot:]
    if spec.layout == "gptj":
        a, b = part[..., 0::2], part[..., 1::2]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = part[..., : rot // 2], part[..., rot // 2 :]
        out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return torch.cat((out, rest), dim=-1).to(x.dtype)


def rerotate(
    keys: torch.Tensor, from_pos: torch.Tensor | int, to_pos: torch.Tensor | int, spec: RopeSpec
) -> torch.Tensor:
    """Move keys [T, H, head_dim] rotated at ``from_pos`` to ``to_pos`` (per row or scalar).

    Exact up to rounding: R(to) x == R(to - from) R(from) x. Returns a new tensor."""
    i64 = torch.int64
    delta = torch.as_tensor(to_pos, dtype=i64) - torch.as_tensor(from_pos, dtype=i64)
    if delta.dim() == 0:
        delta = delta.expand(keys.shape[0])
    if not bool(delta.any()):
        return keys.clone()
    return apply_rope(keys, delta.contiguous(), spec)
