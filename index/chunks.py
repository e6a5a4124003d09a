"""The chunk index: position-independent chunk key -> where its KV blocks are and at which
position that KV was computed.

A chunk's blocks are ordinary blocks in the prefix tree, chained from the chunk key
(index.hashing.chunk_block_keys); this index only adds the chunk's length and canonical start
position. The service persists entries as manifest blocks (cacheservice/manifests.py), so a
restarted service still knows its chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from index.hashing import KEY_BYTES


@dataclass(frozen=True)
class ChunkEntry:
    num_tokens: int
    start_pos: int
    keys: list[bytes]
    # Set on lookup results: all blocks still stored. Not persisted, not compared.
    resident: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        assert self.num_tokens > 0 and self.start_pos >= 0, "validated by the caller"
        assert all(len(k) == KEY_BYTES for k in self.keys), "block keys are 16 bytes"


class ChunkIndex:
    """chunk key -> ChunkEntry, with the namespace seed each chunk belongs to. A chunk lives
    only as long as every one of its blocks: ``drop_block`` removes the chunks of a block that
    left the index (the reverse map ``block key -> chunks`` makes that O(chunks of it))."""

    def __init__(self) -> None:
        self._entries: dict[bytes, ChunkEntry] = {}
        self._ns: dict[bytes, int] = {}
        self._by_block: dict[bytes, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, chunk: bytes) -> bool:
        return chunk in self._entries

    def add(self, ns: int, chunk: bytes, entry: ChunkEntry) -> None:
        assert len(chunk) == KEY_BYTES, "chunk keys are 16 bytes"
        self.remove(chunk)
        self._entries[chunk] = entry
        self._ns[chunk] = ns
        for key in entry.keys:
            self._by_block.setdefault(key, set()).add(chunk)

    def items(self) -> list[tuple[bytes, ChunkEntry]]:
        return list(self._entries.items())

    def drop_block(self, key: bytes) -> list[bytes]:
        """Remove every chunk that uses block ``key``; returns their chunk keys."""
        chunks = list(self._by_block.get(key, ()))
        for chunk in chunks:
            self.remove(chunk)
        return chunks

    def get(self, chunk: bytes, ns: int | None = None) -> ChunkEntry | None:
        """The entry of ``chunk``; None when unknown or (given ``ns``) of another namespace."""
        entry = self._entries.get(chunk)
        if entry is None or (ns is not None and self._ns[chunk] != ns):
            return None
        return entry

    def remove(self, chunk: bytes) -> bool:
        self._ns.pop(chunk, None)
        entry = self._entries.pop(chunk, None)
        if entry is None:
            return False
        for key in entry.keys:
            users = self._by_block.get(key)
            if users is not None:
                users.discard(chunk)
                if not users:
                    del self._by_block[key]
        return True

    def count(self, ns: int) -> int:
        return sum(1 for s in self._ns.values() if s == ns)

    def check_integrity(self) -> None:
        assert self._entries.keys() == self._ns.keys(), "entries and namespaces disagree"
        users: dict[bytes, set[bytes]] = {}
        for chunk, entry in self._entries.items():
            for key in entry.keys:
                users.setdefault(key, set()).add(chunk)
        assert users == self._by_block, "block -> chunks map drifted from the entries"
        for chunk, entry in self._entries.items():
            assert len(chunk) == KEY_BYTES, f"chunk key {chunk!r} is not 16 bytes"
            assert entry.keys, f"chunk {chunk.hex()} has no blocks"
            assert chunk not in entry.keys, f"chunk {chunk.hex()} lists itself as a block"
