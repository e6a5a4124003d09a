"""Per-token K/V in vLLM's CPU paged cache: the probed layout against vLLM's own cache-write
op, and the cache a real engine filled against an independent torch forward of its weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cacheservice.client import CacheClient
from cacheservice.errors import BadRequest
from connectors.blend.base import forward
from connectors.blend.chunking import from_spans
from connectors.blend.hf_llama import HFLlama
from connectors.blend.store import ChunkStore, KVLayout
from connectors.vllm import kv_layout as kvl
from index.hashing import Namespace
from tests.connectors.vllm.blend_support import (
    NUM_LAYERS,
    make_blend_llama,
    make_tokens,
    run_blend_engine,
    start_blend_service,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

HEADS, BLOCK, HEAD = 2, 32, 32


def op_filled_cache(dtype: torch.dtype, slots: torch.Tensor, k, v) -> torch.Tensor:
    from vllm import _custom_ops as ops

    nb = 4
    cache = torch.zeros((nb, HEADS, BLOCK, 2 * HEAD), dtype=dtype)
    kc, vc = cache.view(nb, HEADS, 2 * BLOCK, HEAD).chunk(2, dim=2)
    isa = kvl.cpu_isa(dtype, BLOCK, HEAD, "auto")
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_and_write_agree_with_vllms_write_op(dtype):
    layout = kvl.probe(HEADS, BLOCK, HEAD, dtype, kvl.cpu_isa(dtype, BLOCK, HEAD, "auto"))
    g = torch.Generator().manual_seed(0)
    T = 70  # a request over three scattered blocks, the last one partly filled
    block_ids = torch.tensor([2, 0, 3])
    pos = torch.arange(T)
    slots = block_ids[pos // BLOCK] * BLOCK + pos % BLOCK
    k = torch.randn((T, HEADS, HEAD), generator=g).to(dtype)
    v = torch.randn((T, HEADS, HEAD), generator=g).to(dtype)
    cache = op_filled_cache(dtype, slots, k, v)
    got = kvl.read(cache, layout, block_ids, pos)
    assert torch.equal(got.k, k) and torch.equal(got.v, v)
    mine = torch.zeros_like(cache)
    kvl.write(mine, layout, block_ids, pos, kvl.TokenKV(k, v))
    assert torch.equal(mine, cache), "write must place every element where vLLM's op does"
    some = torch.tensor([69, 3, 40])
    part = kvl.read(cache, layout, block_ids, some)
    assert torch.equal(part.k, k[some]) and torch.equal(part.v, v[some])


def test_bad_shapes_are_refused():
    layout = kvl.probe(HEADS, BLOCK, HEAD, torch.float32, "vec")
    with pytest.raises(BadRequest, match="CPU layout"):
        kvl.read(torch.zeros((2, HEADS, BLOCK, HEAD)), layout, torch.tensor([0]), torch.arange(3))
    with pytest.raises(BadRequest, match="past the request"):
        kvl.read(torch.zeros((2, HEADS, BLOCK, 2 * HEAD)), layout, torch.tensor([0]),
                 torch.tensor([BLOCK]))  # fmt: skip


def test_engine_cache_matches_a_torch_forward(tmp_path):
    """A real engine stores two declared chunks of a prompt, read per token out of its paged
    cache; they equal the K/V of an independent forward of the same weights."""
    model = make_blend_llama(tmp_path / "model")
    rng = np.random.default_rng(7)
    prompt = make_tokens(150, rng)
    spans = [[5, 50], [50, 130]]  # the second crosses two block boundaries
    svc = start_blend_service(tmp_path / "service")
    try:
        spec = {"model": model.path, "url": svc.url, "max_tokens": 2,
                "requests": [{"prompt": prompt, "params": {"chunks": spans}}]}  # fmt: skip
        res = run_blend_engine(spec, tmp_path / "engine.log")
        assert res["worker"]["saved_chunks"] == 2
        ns = Namespace.from_dict(res["worker"]["namespace"])
        with CacheClient(svc.url) as client:
            store = ChunkStore(client, ns, KVLayout(NUM_LAYERS, HEADS, HEAD, BLOCK))
            tokens = torch.tensor(prompt)
            chunks = from_spans(prompt, spans, store.seed)
            loaded = store.load(tokens, chunks)
    finally:
        svc.stop()
    ref = forward(HFLlama(model.path), tokens).kv
    for c in chunks:
        kv = loaded[c.key]
        assert kv is not None and kv.start_pos == c.start
        for i in range(NUM_LAYERS):
            torch.testing.assert_close(kv.keys[i], ref.keys[i][c.start : c.end],
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
            torch.testing.assert_close(kv.values[i], ref.values[i][c.start : c.end],
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
