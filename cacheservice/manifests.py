"""Manifest blocks: index metadata stored as blocks (flag ``FLAG_MANIFEST``) in the durable
tiers, so a restarted service knows its chunks (this module) and namespaces
(``namespaces.py``) before any engine comes back. Key = the chunk key, payload = msgpack.
Manifests are read back from disks and shared tiers: decoding never trusts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from index.chunks import ChunkEntry
from index.hashing import KEY_BYTES, ROOT_KEY
from tiers.base import FLAG_MANIFEST, BlockMeta

MANIFEST_KIND = "chunk"


@dataclass(frozen=True)
class Manifest:
    """A manifest block ready for Tier.put: header + payload."""

    meta: BlockMeta
    payload: bytes


def encode_entry(ns: int, chunk: bytes, entry: ChunkEntry) -> Manifest:
    payload = msgpack.packb(
        {
            "kind": MANIFEST_KIND,
            "num_tokens": entry.num_tokens,
            "start_pos": entry.start_pos,
            "keys": b"".join(entry.keys),
        },
        use_bin_type=True,
    )
    return Manifest(BlockMeta.for_payload(ns, chunk, ROOT_KEY, payload, FLAG_MANIFEST), payload)


def decode_entry(payload: bytes | memoryview) -> ChunkEntry | None:
    """The entry a chunk manifest holds, or None when the payload is another manifest kind or
    malformed (a damaged manifest only costs that chunk's reuse)."""
    try:
        d = msgpack.unpackb(payload, raw=False)
        if not isinstance(d, dict) or d.get("kind") != MANIFEST_KIND:
            return None
        blob, num_tokens, start_pos = d["keys"], d["num_tokens"], d["start_pos"]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException):
        return None
    if not isinstance(blob, bytes) or not blob or len(blob) % KEY_BYTES:
        return None
    ints = isinstance(num_tokens, int) and isinstance(start_pos, int)
    if not ints or num_tokens <= 0 or start_pos < 0:
        return None
    keys = [blob[i : i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]
    return ChunkEntry(num_tokens, start_pos, keys)
