"""A llama2.c checkpoint (legacy format) and its tokenizer, as a BlendModel.

Checkpoint: 7 int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means the classifier is not shared with the embedding), then
float32 weights: embedding, attention rmsnorm, wq, wk, wv, wo, ffn rmsnorm, w1, w2, w3, final
rmsnorm, two legacy RoPE tables (skipped: recomputed), and the classifier when not shared.
RoPE is the GPT-J pair layout, base 10000. Tokenizer: int32 max token length, then per token
a float32 merge score, an int32 byte length and the bytes; id 1 is BOS.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cacheservice.errors import BadRequest
from connectors.blend.base import QKV, BlendLayer, BlendModel
from connectors.blend.rope import RopeSpec, apply_rope

BOS = 1
MODEL_FILE = "models/aidreams260K.bin"
TOKENIZER_FILE = "models/tok512.bin"
_EPS = 1e-5


def shared_dir() -> Path | None:
    """``$CACHESERVICE_SHARED`` or ``<repo>/../shared``; None when neither holds the model."""
    env = os.environ.get("CACHESERVICE_SHARED")
    root = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared"
    return root if (root / MODEL_FILE).is_file() else None


@dataclass(frozen=True)
class Config:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _EPS) * w


class Llama2cLayer(BlendLayer):
    def __init__(self, w: dict[str, torch.Tensor], cfg: Config, rope: RopeSpec):
        self.w, self.cfg, self.rope = w, cfg, rope

    def qkv(self, h: torch.Tensor, positions: torch.Tensor) -> QKV:
        c, w = self.cfg, self.w
        x = _rmsnorm(h, w["rms_att"])
        q = (x @ w["wq"].T).view(-1, c.n_heads, c.head_dim)
        k = (x @ w["wk"].T).view(-1, c.n_kv_heads, c.head_dim)
        v = (x @ w["wv"].T).view(-1, c.n_kv_heads, c.head_dim)
        return QKV(apply_rope(q, positions, self.rope), apply_rope(k, positions, self.rope), v)

    def attend_and_mlp(self, h, q, k_all, v_all, mask):
        c, w = self.cfg, self.w
        rep = c.n_heads // c.n_kv_heads
        k = k_all.repeat_interleave(rep, dim=1).transpose(0, 1)  # [H, Tk, d]
        v = v_all.repeat_interleave(rep, dim=1).transpose(0, 1)
        scores = q.transpose(0, 1) @ k.transpose(1, 2) / c.head_dim**0.5  # [H, Tq, Tk]
        scores = scores.masked_fill(~mask[None], float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(0, 1).reshape(h.shape[0], c.dim)
        h = h + att @ w["wo"].T
        x = _rmsnorm(h, w["rms_ffn"])
        return h + (F.silu(x @ w["w1"].T) * (x @ w["w3"].T)) @ w["w2"].T


class Llama2c(BlendModel):
    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        raw = Path(path).read_bytes()
        if len(raw) < 28:
            raise BadRequest(f"{path} is not a llama2.c checkpoint (shorter than its header)")
        hdr = struct.unpack_from("<7i", raw)
        shared = hdr[5] > 0
        self.cfg = cfg = Config(*hdr[:5], abs(hdr[5]), hdr[6])
        f = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=28).copy()).to(dtype)
        d, hd, L, V = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size
        kv = cfg.n_kv_heads * cfg.head_dim
        sizes = [
            ("emb", (V, d)), ("rms_att", (L, d)), ("wq", (L, d, d)), ("wk", (L, kv, d)),
            ("wv", (L, kv, d)), ("wo", (L, d, d)), ("rms_ffn", (L, d)), ("w1", (L, hd, d)),
            ("w2", (L, d, hd)), ("w3", (L, hd, d)), ("rms_final", (d,)),
            ("freq_cis", (cfg.seq_len * cfg.head_dim,)),
        ]  # fmt: skip
        if not shared:
            sizes.append(("wcls", (V, d)))
        need = sum(int(np.prod(shape)) for _, shape in sizes)
        if need != f.numel():
            raise BadRequest(f"{path}: {f.numel()} weights, header implies {need}; not legacy v0")
        t, off = {}, 0
        for name, shape in sizes:
            n = int(np.prod(shape))
            t[name] = f[off : off + n].view(shape)
            off += n
        self.emb, self.rms_final = t["emb"], t["rms_final"]
        self.wcls = t["emb"] if shared else t["wcls"]
        self.rope = RopeSpec(cfg.head_dim, 10000.0, "gptj")
        per = ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")
        self.layers = [Llama2cLayer({k: t[k][i] for k in per}, cfg, self.rope) for i in range(L)]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.emb[tokens]

    def final(self, h: torch.Tensor) -> torch.Tensor:
        return _rmsnorm(h, self.rms_final) @ self.wcls.T


class Tokenizer:
    """llama2.c BPE: a dummy leading space, single-char pieces (byte fallback ``<0xXX>``), then
    repeatedly merge the adjacent pair whose merged piece scores highest."""

    def __init__(self, path: str | Path):
        raw = Path(path).read_bytes()
        off, self.pieces, self.scores = 4, [], []
        while off < len(raw):
            score, n = struct.unpack_from("<fi", raw, off)
            self.pieces.append(raw[off + 8 : off + 8 + n])
            self.scores.append(score)
            off += 8 + n
        self.ids = {p: i for i, p in enumerate(self.pieces)}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        toks: list[int] = []
        for ch in " " + text if text else "":
            b = ch.encode()
            if b in self.ids:
                toks.append(self.ids[b])
            else:
                toks.extend(self.ids[f"<0x{x:02X}>".encode()] for x in b)
        while True:
            best, at = None, -1
            for i in range(len(toks) - 1):
                m = self.ids.get(self.pieces[toks[i]] + self.pieces[toks[i + 1]])
                if m is not None and (best is None or self.scores[m] > self.scores[best]):
                    best, at = m, i
            if best is None:
                break
            toks[at : at + 2] = [best]
        return [BOS, *toks] if bos else toks

    def decode(self, tokens: list[int]) -> str:
        out = bytearray()
        for t in tokens:
            p = self.pieces[t]
            if p.startswith(b"<0x") and p.endswith(b">") and len(p) == 6:
                out.append(int(p[3:5], 16))
            else:
                out += p
        return out.decode("utf-8", errors="replace")


class Loaded(NamedTuple):
    model: Llama2c
    tokenizer: Tokenizer


def load(root: Path | None = None, dtype: torch.dtype = torch.float32) -> Loaded:
    root = root or shared_dir()
    if root is None:
        raise BadRequest("llama2.c model not found: set CACHESERVICE_SHARED to the shared dir")
    return Loaded(Llama2c(root / MODEL_FILE, dtype), Tokenizer(root / TOKENIZER_FILE))
