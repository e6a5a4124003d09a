"""vLLM's KV-event wire format, read and written without vLLM (msgpack only).

A ZMQ message is ``(topic, seq as 8-byte big-endian, payload)``; the payload is a msgspec
``KVEventBatch`` encoded as an array ``[ts, events, data_parallel_rank]`` whose events are maps
tagged by ``"type"`` (``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``) with defaulted
fields left out (vllm/distributed/kv_events.py). A replay request is the start seq sent to the
publisher's ROUTER socket; the answer is one message per buffered batch, then ``END_SEQ``.

Payloads come from other processes, so decoding never trusts them: anything malformed raises
``EventFormatError`` and an event of an unknown type is skipped (newer vLLM versions add
some), never a crash and never a half-applied batch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import msgpack

END_SEQ = (-1).to_bytes(8, "big", signed=True)
MAX_EVENTS = 65536  # one engine step emits a handful; more is a broken or hostile stream
MAX_HASHES = 65536
MEDIUM_GPU, MEDIUM_CPU, MEDIUM_STORAGE = "GPU", "CPU", "STORAGE"


class EventFormatError(ValueError):
    """A KV-event message that is not vLLM's format; the stream is resynchronised."""


class Stored(NamedTuple):
    hashes: list[bytes | int]
    parent: bytes | int | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None
    lora: bool = False  # a LoRA adapter's KV: never the base model's namespace
    extra: bool = False  # extra keys (cache salt, multimodal): tokens alone do not name it
    group: int = 0
    ownership: str | None = None  # vLLM's "secondary offloading tier identifier"
    locality: str | None = None


class Removed(NamedTuple):
    hashes: list[bytes | int]
    medium: str | None = None
    group: int = 0
    ownership: str | None = None
    locality: str | None = None


class Cleared(NamedTuple):
    pass


Event = Stored | Removed | Cleared


class Batch(NamedTuple):
    ts: float
    events: list[Event]
    dp_rank: int | None = None


def _hashes(value: Any) -> list[bytes | int]:
    if not isinstance(value, list) or len(value) > MAX_HASHES:
        raise EventFormatError("block_hashes must be a list of at most 65536 hashes")
    for h in value:
        if not isinstance(h, bytes | int) or isinstance(h, bool):
            raise EventFormatError(f"a block hash must be bytes or an int, got {type(h).__name__}")
    return value


def _opt(value: Any, kind: type, what: str) -> Any:
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise EventFormatError(f"{what} must be {kind.__name__} or nil, got {value!r:.40}")
    return value


def _event(doc: Any) -> Event | None:
    if not isinstance(doc, dict):
        raise EventFormatError("an event must be a map tagged by 'type'")
    kind = doc.get("type")
    if kind == "BlockStored":
        tokens = doc.get("token_ids")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise EventFormatError("token_ids must be a list of ints")
        size = doc.get("block_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise EventFormatError("block_size must be a non-negative int")
        parent = doc.get("parent_block_hash")
        if parent is not None and (not isinstance(parent, bytes | int) or isinstance(parent, bool)):
            raise EventFormatError("parent_block_hash must be bytes, an int or nil")
        lora = doc.get("lora_id") is not None or doc.get("lora_name") is not None
        extra = doc.get("extra_keys")
        if extra is not None and not isinstance(extra, list):
            raise EventFormatError("extra_keys must be a list or nil")
        return Stored(
            _hashes(doc.get("block_hashes")),
            parent,
            tokens,
            size,
            _opt(doc.get("medium"), str, "medium"),
            lora,
            any(e is not None for e in extra or ()),
            _opt(doc.get("group_idx"), int, "group_idx") or 0,
            _opt(doc.get("ownership"), str, "ownership"),
            _opt(doc.get("locality"), str, "locality"),
        )
    if kind == "BlockRemoved":
        return Removed(
            _hashes(doc.get("block_hashes")),
            _opt(doc.get("medium"), str, "medium"),
            _opt(doc.get("group_idx"), int, "group_idx") or 0,
            _opt(doc.get("ownership"), str, "ownership"),
            _opt(doc.get("locality"), str, "locality"),
        )
    if kind == "AllBlocksCleared":
        return Cleared()
    if not isinstance(kind, str):
        raise EventFormatError("an event's 'type' must be a string")
    return None  # a type this version does not know: skipped


def decode_batch(payload: bytes) -> Batch:
    try:
        doc = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise EventFormatError(f"not msgpack: {e}") from None
    if not isinstance(doc, list) or not 2 <= len(doc) <= 3:
        raise EventFormatError("a batch must be [ts, events, data_parallel_rank]")
    ts, events = doc[0], doc[1]
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        raise EventFormatError("ts must be a finite number")
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise EventFormatError(f"events must be a list of at most {MAX_EVENTS}")
    dp = _opt(doc[2], int, "data_parallel_rank") if len(doc) == 3 else None
    decoded = [e for e in map(_event, events) if e is not None]
    return Batch(float(ts), decoded, dp)


def _encode_event(event: Event) -> dict:
    if isinstance(event, Stored):
        doc = {
            "type": "BlockStored",
            "block_hashes": list(event.hashes),
            "parent_block_hash": event.parent,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": None,
            "medium": event.medium,
            "lora_name": None,
        }
        optional = {"ownership": event.ownership, "locality": event.locality}
        return doc | {k: v for k, v in optional.items() if v is not None}
    if isinstance(event, Removed):
        doc = {"type": "BlockRemoved", "block_hashes": list(event.hashes), "medium": event.medium}
        optional = {"ownership": event.ownership, "locality": event.locality}
        return doc | {k: v for k, v in optional.items() if v is not None}
    return {"type": "AllBlocksCleared"}


def encode_batch(ts: float, events: list[Event], dp_rank: int | None = None) -> bytes:
    """The payload vLLM's own subscribers decode as a ``KVEventBatch``."""
    return msgpack.packb([ts, [_encode_event(e) for e in events], dp_rank], use_bin_type=True)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def parse_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise EventFormatError(f"a sequence number is 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)
