"""RAG prompts for the blend tests: passages of MuSiQue examples, each cached alone after BOS
(canonical start 1), reused in a given order before the question."""

from __future__ import annotations

import torch

from connectors.blend import llama2c
from connectors.blend.recompute import ChunkKV, Segment, encode_chunk


def make_rag_prompt(tiny, example, order, passage_tokens=28, question_tokens=20):
    """BOS + passages (cached alone after BOS, canonical start 1) in ``order`` + question."""
    model, tok = tiny
    bos = torch.tensor([llama2c.BOS])
    ps = [
        torch.tensor(tok.encode(c["text"][: 12 * passage_tokens])[:passage_tokens])
        for c in example["ctxs"][: len(order)]
    ]
    cache: list[ChunkKV] = [encode_chunk(model, p, bos) for p in ps]
    q = torch.tensor(tok.encode("question: " + example["question"])[:question_tokens])
    return [Segment(bos), *(Segment(ps[j], cache[j]) for j in order), Segment(q)]
