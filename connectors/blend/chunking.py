"""Chunk discovery: where in a prompt do reusable chunks (RAG passages, tool outputs) sit?

Two sources, both yielding ``Chunk`` spans keyed by ``index.hashing.chunk_key`` (the same
tokens give the same key at any position):

- caller-declared spans: a RAG pipeline knows where it pasted each document;
- separator tokens: the prompt template puts a separator (e.g. a newline or a special
  ``<doc>`` token) between documents; each run between separators is a chunk and the
  separators themselves stay fresh tokens.

``segments()`` turns a prompt plus its chunks into the fresh/cached segment list that
``recompute.blend_prefill`` consumes, given whatever chunk KV the cache returned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from cacheservice.errors import BadRequest
from connectors.blend.recompute import ChunkKV, Segment
from index.hashing import chunk_key


@dataclass(frozen=True)
class Chunk:
    start: int  # prompt index of the chunk's first token
    end: int  # one past its last token
    key: bytes  # chunk_key(tokens[start:end], seed)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def _as_list(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    return tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)


def from_spans(
    tokens: Sequence[int] | torch.Tensor,
    spans: Iterable[tuple[int, int]],
    seed: int,
    min_tokens: int = 1,
) -> list[Chunk]:
    """Chunks at caller-declared ``(start, end)`` spans; spans shorter than ``min_tokens`` are
    left as fresh tokens. Spans must be in order, inside the prompt and must not overlap."""
    toks = _as_list(tokens)
    out: list[Chunk] = []
    prev_end = 0
    for start, end in spans:
        if not 0 <= start <= end <= len(toks):
            raise BadRequest(
                f"chunk span ({start}, {end}) is outside the prompt of {len(toks)} tokens"
            )
        if start < prev_end:
            raise BadRequest(
                f"chunk span ({start}, {end}) overlaps or precedes the previous one ending "
                f"at {prev_end}: declare spans in prompt order without overlap"
            )
        prev_end = end
        if end - start >= min_tokens:
            out.append(Chunk(start, end, chunk_key(toks[start:end], seed)))
    return out


def from_separators(
    tokens: Sequence[int] | torch.Tensor,
    separators: Iterable[int],
    seed: int,
    start: int = 0,
    end: int | None = None,
    min_tokens: int = 1,
) -> list[Chunk]:
    """Chunks = maximal runs of ``tokens[start:end]`` that contain no separator token.

    ``start``/``end`` fence off a system prompt or the question, which are never chunks."""
    toks = _as_list(tokens)
    end = len(toks) if end is None else end
    if not 0 <= start <= end <= len(toks):
        raise BadRequest(f"range ({start}, {end}) is outside the prompt of {len(toks)} tokens")
    seps = set(separators)
    if not seps:
        raise BadRequest("give at least one separator token id")
    spans, run = [], start
    for i in range(start, end + 1):
        if i == end or toks[i] in seps:
            spans.append((run, i))
            run = i + 1
    return from_spans(toks, spans, seed, min_tokens)


def segments(
    tokens: Sequence[int] | torch.Tensor,
    chunks: Sequence[Chunk],
    cached: Mapping[bytes, ChunkKV | None],
    end: int | None = None,
) -> list[Segment]:
    """Split the prompt into fresh and cached segments. A chunk with no cached KV (a miss)
    becomes fresh tokens: it is computed, never guessed; so does a chunk overlapping an
    earlier one. With ``end`` (a claim boundary, e.g. what an engine takes from the cache), a
    chunk running past it keeps only its cached head, and the tokens from ``end`` on are
    fresh."""
    t = torch.as_tensor(_as_list(tokens), dtype=torch.int64)
    limit = t.shape[0] if end is None else min(end, t.shape[0])
    out: list[Segment] = []
    at = 0
    for c in chunks:
        kv = cached.get(c.key)
        stop = min(c.end, limit)
        if kv is None or c.start < at or stop <= c.start:
            continue
        if c.start > at:
            out.append(Segment(t[at : c.start]))
        out.append(Segment(t[c.start : stop], kv.head(stop - c.start)))
        at = stop
    if at < t.shape[0]:
        out.append(Segment(t[at:]))
    return out
