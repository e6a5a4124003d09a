"""RAG / agent use of the client API: register document chunks once, find them again later.

Run a service first (``cacheservice serve``), then ``python examples/rag_client.py [--url U]``.

A RAG pipeline knows its passages, so it can tell the service which token spans are chunks.
In production the engine connector stores each chunk's KV (computed at ``start_pos``) and
the pipeline only registers/looks up; here the KV bytes are stand-ins of the right size so
the example runs without an engine. Tokens come from a toy byte-level tokenizer: use your
model's tokenizer in real code (keys must be computed from the exact ids the engine sees).
"""

from __future__ import annotations

import argparse
import json
import os

from cacheservice.client import CacheClient
from cacheservice.errors import ServiceUnavailable
from index.hashing import Namespace, chunk_block_keys, chunk_key

PASSAGES = [
    "Redis is an in-memory data store used as a database, cache and message broker.",
    "KV caches hold the attention keys and values of tokens a model has already seen.",
    "Position-independent reuse re-rotates cached keys with RoPE to move a chunk.",
]
BLOCK_BYTES = 2048  # bytes of KV per block of 16 tokens; the engine's real size in practice


def toy_tokenize(text: str) -> list[int]:
    return list(text.encode())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("CACHESERVICE_URL", "http://127.0.0.1:8642"))
    p.add_argument("--token", default=os.environ.get("CACHESERVICE_TOKEN"))
    args = p.parse_args()

    ns = Namespace(model="example/rag-model", dtype="bfloat16", layout="NHD", block_tokens=16)
    with CacheClient(args.url, token=args.token) as client:
        try:
            info = client.register(ns, BLOCK_BYTES)
        except ServiceUnavailable as e:
            print(f"no cacheservice at {args.url}: {e}")
            return 1
        chunks = []
        pos = 0  # canonical position: where the chunk's KV was computed
        for text in PASSAGES:
            tokens = toy_tokenize(text)
            ck = chunk_key(tokens, ns.seed)
            keys = chunk_block_keys(tokens, ns.seed, ns.block_tokens)
            kv = bytes(BLOCK_BYTES) * len(keys)  # stand-in for the engine's KV of this chunk
            client.register_chunk(info.ns, ck, len(tokens), pos, keys, kv)
            chunks.append(ck)
            pos += len(tokens)

        # Later, a new prompt retrieves passages 2 and 0 (in another order, at other positions):
        wanted = [chunks[2], chunks[0], chunk_key(toy_tokenize("never stored"), ns.seed)]
        for ck, entry in zip(wanted, client.lookup_chunks(info.ns, wanted), strict=True):
            if entry is None:
                print(f"chunk {ck.hex()[:12]}: miss (prefill it, then register it)")
            else:
                print(
                    f"chunk {ck.hex()[:12]}: hit, {entry.num_tokens} tokens in "
                    f"{len(entry.keys)} blocks, KV computed at position {entry.start_pos}"
                )
        stats = client.stats()
        print(json.dumps({k: stats[k] for k in ("blocks", "hits", "misses", "stores")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
