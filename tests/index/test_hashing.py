from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from index.hashing import (
    KEY_BYTES,
    ROOT_KEY,
    SPOT_LINE,
    SPOT_LINES,
    Namespace,
    chunk_block_keys,
    chunk_key,
    prefix_keys,
    spot_checksum,
)


def make_ns(**kw) -> Namespace:
    base = dict(model="m", dtype="bfloat16", layout="NHD", block_tokens=4)
    base.update(kw)
    return Namespace(**base)


def test_keys_identical_across_list_numpy_torch():
    seed = make_ns().seed
    tokens = list(range(1000, 1037))
    a = prefix_keys(tokens, seed, 4)
    b = prefix_keys(np.array(tokens, dtype=np.int64), seed, 4)
    c = prefix_keys(torch.tensor(tokens).numpy(), seed, 4)
    assert a == b == c
    assert len(a) == 9 and all(len(k) == KEY_BYTES for k in a)
    assert len(set(a)) == len(a)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "m2"},
        {"dtype": "float16"},
        {"layout": "HND"},
        {"block_tokens": 8},
        {"tp_rank": 1, "tp_size": 2},
        {"tp_size": 2},
        {"salt": "x"},
        {"format_version": 2},
    ],
)
def test_any_namespace_field_changes_keys(change):
    base = make_ns()
    other = dataclasses.replace(base, **change)
    assert other.seed != base.seed and other.id != base.id
    tokens = list(range(16))
    assert prefix_keys(tokens, base.seed, 4)[0] != prefix_keys(tokens, other.seed, 4)[0]
    assert chunk_key(tokens, base.seed) != chunk_key(tokens, other.seed)


def test_namespace_roundtrip_and_id_format():
    ns = make_ns(salt="s")
    assert Namespace.from_dict(ns.to_dict()) == ns
    assert len(ns.id) == 16 and int(ns.id, 16) == ns.seed


def test_chaining_and_partial_blocks():
    seed = make_ns().seed
    tokens = list(range(10))
    keys = prefix_keys(tokens, seed, 4)
    assert len(keys) == 2  # the trailing 2 tokens form no key
    # continuing from the key of block 0 gives block 1's key
    assert prefix_keys(tokens[4:8], seed, 4, parent=keys[0]) == [keys[1]]
    # same tokens after a different history give a different key
    assert prefix_keys(tokens[4:8], seed, 4) != [keys[1]]
    # a change in block 0 changes every later key
    changed = prefix_keys([99] + tokens[1:], seed, 4)
    assert changed[0] != keys[0] and changed[1] != keys[1]
    assert prefix_keys([], seed, 4) == []


def test_chunk_keys_position_independent_and_disjoint_from_prefix():
    seed = make_ns().seed
    doc = list(range(500, 510))
    a = chunk_block_keys(doc, seed, 4)
    b = chunk_block_keys(np.array(doc), seed, 4)
    assert a == b and len(a) == 3  # 2 full blocks + partial tail
    prefixed = [7, 7, 7] + doc
    assert chunk_key(prefixed[3:], seed) == chunk_key(doc, seed)
    pk = prefix_keys(doc, seed, 4)
    assert chunk_key(doc[:4], seed) != pk[0]
    assert not set(a) & set(pk)
    assert chunk_key(doc, seed) not in a
    # an exact multiple of the block size has no tail block
    assert len(chunk_block_keys(doc[:8], seed, 4)) == 2


@pytest.mark.parametrize("bad", [[-1, 2], [2**32], [[1, 2], [3, 4]]])
def test_bad_tokens_rejected(bad):
    with pytest.raises(ValueError):
        prefix_keys(bad, 1, 1)


@pytest.mark.parametrize("kw", [{"block_tokens": 0}, {"tp_rank": 2, "tp_size": 2}, {"model": ""}])
def test_bad_namespace_rejected(kw):
    with pytest.raises(ValueError):
        make_ns(**kw)


def test_root_key_is_zero():
    assert ROOT_KEY == bytes(16)


@pytest.mark.parametrize("size", [1000, 4096, 258048, 2 << 20, 32 << 20])
def test_spot_checksum_samples_a_fixed_number_of_spread_lines(size):
    """Any change to a sampled line (the first, one far in, the last) changes the spot; a
    byte between the lines does not: that one is for the readers' full checksum. Under 4 KiB
    every byte is sampled."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    spot = spot_checksum(data)
    stride = size // SPOT_LINES // SPOT_LINE * SPOT_LINE
    sampled = [0, size - 1] + ([(SPOT_LINES - 1) * stride + 5] if stride > SPOT_LINE else [])
    for at in sampled:
        changed = data.copy()
        changed[at] ^= 0xFF
        assert spot_checksum(changed) != spot, f"byte {at} of {size} is sampled"
    between = data.copy()
    between[SPOT_LINE + 1] ^= 0xFF
    assert (spot_checksum(between) == spot) == (stride > SPOT_LINE)
    other = np.random.default_rng(size + 1).integers(0, 256, size, dtype=np.uint8)
    assert spot_checksum(other) != spot, "another writer's block is told apart"
