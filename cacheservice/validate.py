"""The trust boundary for keys: every key list a client (over HTTP or in process) hands the
service is checked here, once, before anything changes.

A key list must be 16-byte keys, at most ``max_keys`` of them, each once (block keys are
chained hashes: a list that repeats a key is a cycle), none the root, none the parent it
chains from. An answer must fit ``max_response_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cacheservice.errors import BadRequest, TooLarge
from index.hashing import KEY_BYTES, ROOT_KEY


def key_list(
    keys: Sequence[bytes] | bytes | memoryview,
    max_keys: int,
    what: str = "keys",
    parent: bytes | None = None,
) -> list[bytes]:
    if isinstance(keys, bytes | bytearray | memoryview):
        blob = bytes(keys)
        if len(blob) % KEY_BYTES:
            raise BadRequest(
                f"{what} is {len(blob)} bytes, not a multiple of {KEY_BYTES}: send the "
                "16-byte keys of index.hashing concatenated"
            )
        # numpy splits at C speed (4x a slicing loop): 16-byte voids come back as bytes
        keys = np.frombuffer(blob, dtype=f"V{KEY_BYTES}").tolist()
    else:
        keys = list(keys)
        for i, k in enumerate(keys):
            if not isinstance(k, bytes) or len(k) != KEY_BYTES:
                raise BadRequest(f"{what}[{i}] must be a {KEY_BYTES}-byte key (a msgpack bin)")
    if len(keys) > max_keys:
        raise TooLarge(
            f"{len(keys)} {what} exceed max_keys={max_keys}: split the request or "
            "raise the service's --max-keys"
        )
    distinct = set(keys)
    if len(distinct) != len(keys):
        seen: set[bytes] = set()
        dup = next(i for i, k in enumerate(keys) if k in seen or seen.add(k))
        raise BadRequest(
            f"{what}[{dup}] repeats an earlier key: block keys are chained hashes, distinct "
            "within one request (send each block once)"
        )
    if ROOT_KEY in distinct:
        raise BadRequest(f"{what} holds ROOT_KEY (16 zero bytes), which names no block")
    if parent is not None and parent in distinct:
        raise BadRequest(
            f"{what} holds its own parent: a block cannot chain from itself or from a "
            "block after it (index.hashing.prefix_keys chains each key from the previous)"
        )
    return keys


class KeyBlob(Sequence[bytes]):
    """n keys sent as one bin, indexed without splitting them (a lookup probes ~13)."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __len__(self) -> int:
        return len(self.blob) // KEY_BYTES

    def __getitem__(self, i):  # type: ignore[override]
        assert isinstance(i, int), "KeyBlob is indexed by position only"
        return self.blob[i * KEY_BYTES : (i + 1) * KEY_BYTES]


def key_blob(keys: Sequence[bytes] | bytes | memoryview, max_keys: int) -> Sequence[bytes]:
    """The light check for read-only index probes: whole keys, at most ``max_keys``. Repeats
    and the root need no refusal there: a probe changes nothing, and neither can match."""
    if not isinstance(keys, bytes | bytearray | memoryview):
        return key_list(keys, max_keys)
    if len(keys) % KEY_BYTES:
        key_list(keys, max_keys)  # raises the error a malformed blob gets everywhere
    if len(keys) // KEY_BYTES > max_keys:
        key_list(keys, max_keys)
    return KeyBlob(bytes(keys))


def one_key(key: bytes, what: str) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise BadRequest(f"{what} must be a {KEY_BYTES}-byte key (ROOT_KEY = 16 zero bytes)")
    return key


def response_fits(n: int, block_bytes: int, limit: int) -> None:
    if n * block_bytes > limit:
        most = max(1, limit // block_bytes)
        raise TooLarge(
            f"{n} blocks of {block_bytes} bytes exceed the response limit of {limit} bytes: "
            f"ask for at most {most} keys per call"
        )
