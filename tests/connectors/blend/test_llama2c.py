from __future__ import annotations

import pytest
import torch

from cacheservice.errors import BadRequest
from connectors.blend import llama2c
from connectors.blend.base import forward, greedy


def test_greedy_from_bos_is_english(tiny):
    model, tok = tiny
    res = forward(model, torch.tensor([llama2c.BOS]))
    text = tok.decode(greedy(model, res.logits[-1], res.kv, 24))
    # the README's reference greedy output of this checkpoint
    assert text.startswith(' "Echoes of vectors unfold, a gentle hum of precision')


def test_config_and_shapes(tiny):
    model, _ = tiny
    assert model.cfg == llama2c.Config(64, 172, 4, 4, 4, 512, 128)
    assert model.num_layers == 4 and model.rope.layout == "gptj"
    res = forward(model, torch.tensor([1, 50, 60]))
    assert res.logits.shape == (3, 512)
    assert res.kv.keys[0].shape == (3, 4, 16)


def test_incremental_decode_equals_prefill(tiny):
    model, tok = tiny
    tokens = torch.tensor(tok.encode("the quiet river of numbers", bos=True))
    full = forward(model, tokens)
    step = forward(model, tokens[:3])
    logits = [step.logits]
    for t in tokens[3:]:
        step = forward(model, t.view(1), step.kv)
        logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits), full.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(step.kv.keys, full.kv.keys, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tokenizer_roundtrip(tiny):
    _, tok = tiny
    text = "hannibal and scipio, 1635 — ünïcode"
    ids = tok.encode(text, bos=True)
    assert ids[0] == llama2c.BOS and len(ids) < len(text.encode()) + 2
    assert tok.decode(ids[1:]) == " " + text
    assert tok.vocab_size == 512


def test_truncated_checkpoint_is_a_clear_error(tmp_path, tiny):
    bad = tmp_path / "bad.bin"
    good = (llama2c.shared_dir() / llama2c.MODEL_FILE).read_bytes()
    bad.write_bytes(good[:-400])
    with pytest.raises(BadRequest, match="weights"):
        llama2c.Llama2c(bad)
