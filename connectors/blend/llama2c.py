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

from cacheservice.errors import BadRequest
from connectors.blend.llama import Llama, LlamaShape
from connectors.blend.rope import RopeSpec

BOS = 1
MODEL_FILE = "models/aidreams260K.bin"
TOKENIZER_FILE = "models/tok512.bin"
_EPS = 1e-5


def shared_dir() -> Path | None:
    """Where the trained llama2.c model and the MuSiQue set live: ``$CACHESERVICE_SHARED``, or
    the copies the repository ships in ``tests/assets``; None when neither holds the model."""
    env = os.environ.get("CACHESERVICE_SHARED")
    repo = Path(__file__).resolve().parents[2]
    for root in [Path(env)] if env else [repo / "tests" / "assets"]:
        if (root / MODEL_FILE).is_file():
            return root
    return None


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


_RENAME = {"w1": "gate", "w3": "up", "w2": "down"}  # llama2.c's SwiGLU names


class Llama2c(Llama):
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
        rope = RopeSpec(cfg.head_dim, 10000.0, "gptj")
        shape = LlamaShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, _EPS, rope)
        per = ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")
        layers = [{_RENAME.get(k, k): t[k][i] for k in per} for i in range(L)]
        lm_head = t["emb"] if shared else t["wcls"]
        super().__init__(t["emb"], layers, t["rms_final"], lm_head, shape)


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
