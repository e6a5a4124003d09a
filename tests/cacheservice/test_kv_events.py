"""vLLM's KV-event wire format read without vLLM: what hostile or newer streams do to it."""

from __future__ import annotations

import msgpack
import pytest

from cacheservice.kv_events import (
    Batch,
    Cleared,
    EventFormatError,
    Removed,
    Stored,
    decode_batch,
    encode_batch,
    parse_seq,
    seq_bytes,
)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


STORED = {"type": "BlockStored", "block_hashes": [b"\x01" * 32], "parent_block_hash": None,
          "token_ids": [1, 2], "block_size": 2, "lora_id": None, "medium": "GPU",
          "lora_name": None}  # fmt: skip


def test_round_trip_of_every_event_kind() -> None:
    events = [
        Stored(
            [b"a" * 16, 7], b"p" * 16, [1, 2, 3, 4], 2, "CPU", ownership="host", locality="LOCAL"
        ),  # fmt: skip
        Removed([b"a" * 16], "STORAGE", ownership="disk", locality="LOCAL"),
        Cleared(),
    ]
    batch = decode_batch(encode_batch(12.5, events))
    assert batch == Batch(12.5, events, None)


def test_the_shape_vllm_omits_defaults_in_decodes() -> None:
    # omit_defaults: a batch without data_parallel_rank, a BlockRemoved without group_idx.
    doc = [1.0, [STORED, {"type": "BlockRemoved", "block_hashes": [5], "medium": "GPU"}]]
    batch = decode_batch(pack(doc))
    assert batch.dp_rank is None and len(batch.events) == 2
    assert batch.events[0].hashes == [b"\x01" * 32] and batch.events[1].hashes == [5]


def test_lora_and_extra_keys_are_flagged_and_unknown_event_types_skipped() -> None:
    lora = STORED | {"lora_name": "adapter"}
    salted = STORED | {"extra_keys": [["salt"]]}
    plain = STORED | {"extra_keys": [None]}
    batch = decode_batch(pack([1.0, [lora, salted, plain, {"type": "BlockMovedToMars"}], 0]))
    assert [(e.lora, e.extra) for e in batch.events] == [(True, False), (False, True),
                                                         (False, False)]  # fmt: skip


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1not msgpack",
        pack({"ts": 1.0}),
        pack([1.0]),
        pack(["soon", []]),
        pack([float("nan"), []]),
        pack([1.0, {"events": []}]),
        pack([1.0, ["BlockStored"]]),
        pack([1.0, [{"type": 7}]]),
        pack([1.0, [STORED | {"block_hashes": "abc"}]]),
        pack([1.0, [STORED | {"block_hashes": [1.5]}]]),
        pack([1.0, [STORED | {"block_hashes": [True]}]]),
        pack([1.0, [STORED | {"token_ids": ["a"]}]]),
        pack([1.0, [STORED | {"block_size": -1}]]),
        pack([1.0, [STORED | {"parent_block_hash": [1]}]]),
        pack([1.0, [STORED | {"medium": 3}]]),
        pack([1.0, [STORED | {"extra_keys": "x"}]]),
        pack([1.0, [], "rank"]),
        pack([1.0, [STORED] * 70_000]),
    ],
)
def test_malformed_batches_raise_one_typed_error(payload: bytes) -> None:
    with pytest.raises(EventFormatError):
        decode_batch(payload)


def test_sequence_frames() -> None:
    assert parse_seq(seq_bytes(2**40)) == 2**40
    with pytest.raises(EventFormatError):
        parse_seq(b"\x00" * 7)
