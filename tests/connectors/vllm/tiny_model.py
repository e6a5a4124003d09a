"""Build a tiny Llama with random weights and an offline-trained tokenizer in a directory, so
vLLM tests and benchmarks never download anything."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

WORDS = (
    "the cache stores keys and values of every block so that a prompt seen before is not "
    "computed again by the engine while the service keeps blocks in memory on disk and in redis "
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    "sigma tau upsilon phi chi psi omega one two three four five six seven eight nine ten"
).split()


@dataclass(frozen=True)
class TinyLlama:
    path: str
    num_layers: int
    hidden: int
    vocab: int


def _train_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def make_tiny_llama(
    path: str,
    *,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 2,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab: int = 512,
    max_positions: int = 4096,
    seed: int = 0,
) -> TinyLlama:
    """Write a random-weight LlamaForCausalLM (float32) and its tokenizer to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = os.path.join(path, "tiny_llama.json")
    spec = {
        "layers": num_layers,
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "vocab": vocab,
        "seed": seed,
    }
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                return TinyLlama(path, num_layers, hidden, vocab)
    os.makedirs(path, exist_ok=True)
    tokenizer = _train_tokenizer(vocab)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Larger-than-default weights make random logits less flat, so greedy outputs
        # depend visibly on the attention inputs (a wrong KV changes the tokens).
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    with open(marker, "w") as f:
        json.dump(spec, f)
    return TinyLlama(path, num_layers, hidden, vocab)
