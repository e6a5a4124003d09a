from __future__ import annotations

import json

import pytest
import torch

from connectors.blend import llama2c
from connectors.blend.recompute import ChunkKV, Segment, encode_chunk


@pytest.fixture(scope="session")
def tiny():
    root = llama2c.shared_dir()
    if root is None:
        pytest.skip("llama2.c model missing: set CACHESERVICE_SHARED to the shared dir")
    return llama2c.load(root)


@pytest.fixture(scope="session")
def musique():
    root = llama2c.shared_dir()
    path = None if root is None else root / "data" / "musique_s.json"
    if path is None or not path.is_file():
        pytest.skip("musique_s.json missing from the shared dir")
    return json.loads(path.read_text())


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
