from __future__ import annotations

import msgpack

from cacheservice.manifests import decode_entry, encode_entry
from index.chunks import ChunkEntry, ChunkIndex
from index.hashing import ROOT_KEY, chunk_block_keys, chunk_key
from tiers.base import FLAG_MANIFEST

SEED = 42


def make_entry(doc: list[int], start_pos: int = 0) -> tuple[bytes, ChunkEntry]:
    return chunk_key(doc, SEED), ChunkEntry(len(doc), start_pos, chunk_block_keys(doc, SEED, 4))


def test_add_get_remove_and_namespace_filter():
    idx = ChunkIndex()
    ck, entry = make_entry(list(range(10)), start_pos=7)
    idx.add(SEED, ck, entry)
    assert ck in idx and len(idx) == 1 and idx.count(SEED) == 1
    assert idx.get(ck) == entry and idx.get(ck, ns=SEED) == entry
    assert idx.get(ck, ns=SEED + 1) is None
    assert idx.get(b"z" * 16) is None
    idx.check_integrity()
    assert idx.remove(ck) and not idx.remove(ck)
    assert len(idx) == 0
    idx.check_integrity()


def test_manifest_roundtrip():
    ck, entry = make_entry(list(range(100, 133)), start_pos=12)
    m = encode_entry(SEED, ck, entry)
    assert m.meta.flags == FLAG_MANIFEST and m.meta.key == ck and m.meta.parent == ROOT_KEY
    assert m.meta.ns == SEED and m.meta.length == len(m.payload)
    m.meta.verify(m.payload)
    assert decode_entry(m.payload) == entry
    assert decode_entry(memoryview(m.payload)) == entry


def test_bad_manifest_is_none_not_crash():
    assert decode_entry(b"\xc1garbage") is None
    assert decode_entry(msgpack.packb({"kind": "namespace"})) is None
    bad_keys = msgpack.packb({"kind": "chunk", "num_tokens": 1, "start_pos": 0, "keys": b"abc"})
    assert decode_entry(bad_keys) is None
    bad_tokens = msgpack.packb({"kind": "chunk", "num_tokens": 0, "start_pos": 0, "keys": b""})
    assert decode_entry(bad_tokens) is None
