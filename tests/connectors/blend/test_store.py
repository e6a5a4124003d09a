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


def test_reads_go_through_the_arena_and_a_lying_slot_is_never_used(tiny, musique, make_service):
    """Same host: chunk bytes go into and come out of the arena, not HTTP bodies. A slot whose
    bytes no longer match its checksum is not used: the read falls back to HTTP, where the
    service drops the bad copy and serves the disk tier's."""
    from cacheservice.client import CacheClient
    from connectors.blend.chunking import from_spans
    from connectors.blend.store import ChunkStore
    from index.hashing import Namespace, chunk_block_keys

    svc = make_service(extra=["--arena-bytes", "64MiB", "--slot-bytes", str(132 << 10)])
    model, tok = tiny
    cfg = model.cfg
    layout = KVLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 16)
    ns = Namespace("llama2c/aidreams260K", "float32", "blend-kv-v1", 16)
    doc = torch.tensor(tok.encode(musique[7]["ctxs"][0]["text"][:300])[:40])
    prompt = torch.cat((torch.tensor([1]), doc))
    with CacheClient(svc.url) as client:
        store, plain = ChunkStore(client, ns, layout), ChunkStore(client, ns, layout, arena=False)
        ref = encode_chunk(model, doc, torch.tensor([1]))
        assert store.save(ref)
        chunks = from_spans(prompt, [(1, 41)], store.seed)
        (a,) = store.load(prompt, chunks).values()
        (b,) = plain.load(prompt, chunks).values()
        assert store.stats == {
            "arena_reads": 1,
            "http_reads": 0,
            "arena_saves": 1,
            "http_saves": 0,
        }, "no chunk byte went through an HTTP body"
        assert plain.stats == {"arena_reads": 0, "http_reads": 1, "arena_saves": 0, "http_saves": 0}
        for x, y, z in zip(
            a.keys + a.values, b.keys + b.values, ref.keys + ref.values, strict=True
        ):
            assert torch.equal(x, z) and torch.equal(y, z)
        keys = chunk_block_keys(doc.tolist(), store.seed, 16)
        svc.corrupt_arena_copy(ns, layout.block_bytes, keys, index=1)
        (c,) = store.load(prompt, chunks).values()
        store.close()
    assert store.stats["http_reads"] == 1, "the lying slot sent the read to HTTP"
    assert c is not None, "the disk tier's copy serves it"
    for x, z in zip(c.keys + c.values, ref.keys + ref.values, strict=True):
        assert torch.equal(x, z), "never the corrupt bytes"


def test_a_save_the_arena_cannot_hold_goes_as_a_body_to_the_disk_tier(make_service):
    """Four slots, a five-block chunk: one reserve gets at most half the arena, so the chunk is
    not whole in shared memory; the save then sends it as a body (lower tiers keep it) and
    a read finds every block."""
    from cacheservice.client import CacheClient
    from connectors.blend.chunking import from_spans
    from connectors.blend.store import ChunkStore
    from index.hashing import Namespace

    layout = KVLayout(2, 3, 4, 16)
    svc = make_service(extra=["--arena-bytes", str(4 * (8 << 10)), "--slot-bytes", "8KiB"])
    ns = Namespace("tiny-arena", "float32", "blend-kv-v1", 16)
    chunk = make_chunk(80)
    with CacheClient(svc.url) as client:
        store = ChunkStore(client, ns, layout)
        assert store.save(chunk)
        assert store.stats["arena_saves"] == 0 and store.stats["http_saves"] == 1
        prompt = torch.cat((torch.tensor([1]), chunk.tokens, torch.tensor([2])))
        (got,) = store.load(prompt, from_spans(prompt, [(1, 81)], store.seed)).values()
        store.close()
    assert got is not None and got.start_pos == chunk.start_pos
    for a, b in zip(got.keys + got.values, chunk.keys + chunk.values, strict=True):
        assert torch.equal(a, b)
