from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cacheservice.errors import BadRequest
from connectors.blend.recompute import ChunkKV, FirstK, encode_chunk
from connectors.blend.store import KVLayout, pack, unpack

ROOT = Path(__file__).resolve().parents[3]


def make_chunk(n: int, layers=2, heads=3, d=4, start_pos=1) -> ChunkKV:
    g = torch.Generator().manual_seed(n)
    ks = [torch.randn(n, heads, d, generator=g) for _ in range(layers)]
    vs = [torch.randn(n, heads, d, generator=g) for _ in range(layers)]
    return ChunkKV(torch.arange(100, 100 + n), start_pos, ks, vs)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40])
def test_pack_roundtrip_pads_the_last_block(n):
    layout = KVLayout(2, 3, 4, 16)
    c = make_chunk(n)
    data = pack(c, layout)
    assert len(data) == -(-n // 16) * layout.block_bytes
    back = unpack(c.tokens, c.start_pos, data, layout)
    assert back.start_pos == 1 and torch.equal(back.tokens, c.tokens)
    for a, b in zip(back.keys + back.values, c.keys + c.values, strict=True):
        assert torch.equal(a, b)


def test_pack_rejects_a_wrong_layout():
    with pytest.raises(BadRequest, match="layout"):
        pack(make_chunk(5), KVLayout(3, 3, 4, 16))
    with pytest.raises(BadRequest, match="dtype"):
        KVLayout(2, 3, 4, 16, dtype="int3")


@pytest.fixture
def service_url(make_service) -> str:
    """A real service process with slots for the tiny model's chunk blocks."""
    return make_service(extra=["--arena-bytes", "64MiB", "--slot-bytes", str(132 << 10)]).url


def test_chunks_through_the_service_feed_a_blended_prefill(tiny, musique, service_url):
    from cacheservice.client import CacheClient
    from connectors.blend.chunking import from_spans, segments
    from connectors.blend.recompute import blend_prefill
    from connectors.blend.store import ChunkStore
    from index.hashing import Namespace

    from .test_recompute import full_of

    model, tok = tiny
    cfg = model.cfg
    layout = KVLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 16)
    ns = Namespace("llama2c/aidreams260K", "float32", "blend-kv-v1", 16)
    bos = torch.tensor([1])
    docs = [torch.tensor(tok.encode(c["text"][:300])[:27]) for c in musique[4]["ctxs"][:2]]
    with CacheClient(service_url) as client:
        store = ChunkStore(client, ns, layout)
        for d in docs:
            assert store.save(encode_chunk(model, d, bos))
        q = torch.tensor(tok.encode("question: " + musique[4]["question"])[:16])
        prompt = torch.cat((bos, docs[1], docs[0], q))
        n0, n1 = docs[1].shape[0], docs[0].shape[0]
        chunks = from_spans(prompt, [(1, 1 + n0), (1 + n0, 1 + n0 + n1)], store.seed)
        found = store.load(prompt, chunks)
        assert all(v is not None for v in found.values())
        segs = segments(prompt, chunks, found)
        assert [s.cached is not None for s in segs] == [False, True, True, False]
        assert segs[1].cached.start_pos == 1
        ref = encode_chunk(model, docs[1], bos)
        assert torch.equal(segs[1].cached.keys[2], ref.keys[2])  # float32 round trip exact
        res = blend_prefill(model, segs, FirstK(10_000))
        full = full_of(model, segs)
        torch.testing.assert_close(res.logits[-1], full.logits[-1], rtol=1e-4, atol=1e-4)
        miss = store.load(prompt, from_spans(prompt, [(2, 9)], store.seed))
        assert list(miss.values()) == [None]
