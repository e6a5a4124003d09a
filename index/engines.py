"""What each engine holds in its own KV cache, as our block keys (the GPU tier of the design).

An engine announces its cache through KV events: "blocks with these engine hashes, chained to
that parent hash, hold these tokens" and "these hashes left". Our key of a block is a function
of its parent's key and its tokens (index/hashing.py), so one ``EngineBlocks`` per engine turns
the engine's hash chain into ours without knowing how the engine hashes: the first block of a
chain hangs off ``ROOT_KEY``, every other off the key its parent hash mapped to. The engine's
hash algorithm does not matter here; only its tokens and chaining do.

Contract:
- ``stored`` maps and holds the blocks of one event; blocks whose chain cannot be followed
  (unknown parent, a block size that is not the namespace's, token counts that do not add up)
  are counted in ``unmapped`` and never guessed: a route never claims a block we cannot name.
- ``removed`` and ``clear`` only ever shrink what is held. The hash -> key map outlives a
  removal (a later block may chain from an evicted parent), bounded by ``max_hashes``: the
  oldest mappings of blocks not held go first.
- Callers own every returned value; nothing here does I/O or knows about sockets.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from itertools import takewhile

from index.hashing import ROOT_KEY, prefix_keys

EngineHash = Hashable  # vLLM sends bytes or (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES) ints


class EngineBlocks:
    """One engine's cached blocks in one namespace."""

    def __init__(self, seed: int, block_tokens: int, max_blocks: int = 1 << 20) -> None:
        assert block_tokens > 0 and max_blocks > 0, "block_tokens and max_blocks are positive"
        self.seed = seed
        self.block_tokens = block_tokens
        self.max_blocks = max_blocks
        self.max_hashes = 2 * max_blocks
        self._key_of: OrderedDict[EngineHash, bytes] = OrderedDict()  # oldest mapping first
        self._held: dict[bytes, int] = {}  # our key -> how many held engine hashes name it
        self._held_hashes: set[EngineHash] = set()
        self.unmapped = 0  # blocks announced that could not be named (see the contract)
        self.overflow = 0  # blocks refused because max_blocks are held already

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: bytes) -> bool:
        return key in self._held

    def stored(
        self,
        parent_hash: EngineHash | None,
        hashes: Sequence[EngineHash],
        token_ids: Sequence[int],
        block_size: int,
    ) -> int:
        """Blocks ``hashes`` (in chain order after ``parent_hash``; None: a prompt's first
        block) now hold ``token_ids``. Returns how many were mapped and held."""
        n = len(hashes)
        if block_size != self.block_tokens or len(token_ids) != n * block_size or n == 0:
            self.unmapped += n
            return 0
        parent = ROOT_KEY if parent_hash is None else self._key_of.get(parent_hash)
        if parent is None:
            self.unmapped += n
            return 0
        try:
            keys = prefix_keys(token_ids, self.seed, block_size, parent)
        except (ValueError, TypeError, OverflowError):  # token ids that are not uint32
            self.unmapped += n
            return 0
        held = 0
        for h, key in zip(hashes, keys, strict=True):
            if h in self._held_hashes:
                old = self._key_of[h]
                if old == key:
                    held += 1
                    continue
                self._release(h)  # the engine reused a hash for other tokens: trust the new
            if len(self._held_hashes) >= self.max_blocks:
                self.overflow += 1
                continue
            self._key_of[h] = key
            self._key_of.move_to_end(h)
            self._held_hashes.add(h)
            self._held[key] = self._held.get(key, 0) + 1
            held += 1
        self._trim()
        return held

    def removed(self, hashes: Sequence[EngineHash]) -> int:
        """The engine dropped ``hashes``; returns how many of them were held."""
        gone = 0
        for h in hashes:
            if h in self._held_hashes:
                self._release(h)
                gone += 1
        return gone

    def clear(self) -> None:
        """The engine holds nothing any more (cleared, restarted, or its stream was lost)."""
        self._key_of.clear()
        self._held.clear()
        self._held_hashes.clear()

    def run(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, this engine holds."""
        # takewhile + list run at C speed (1.6x the plain loop): routers call this per engine
        return len(list(takewhile(self._held.__contains__, keys)))

    def _release(self, h: EngineHash) -> None:
        self._held_hashes.discard(h)
        key = self._key_of[h]
        left = self._held[key] - 1
        if left:
            self._held[key] = left
        else:
            del self._held[key]

    def _trim(self) -> None:
        # Mappings of blocks no longer held are kept only while there is room: they let a child
        # announced after its parent's eviction still be named.
        excess = len(self._key_of) - self.max_hashes
        if excess <= 0:
            return
        drop: list[EngineHash] = []
        for h in self._key_of:  # oldest first
            if h not in self._held_hashes:
                drop.append(h)
                if len(drop) == excess:
                    break
        for h in drop:
            del self._key_of[h]

    def check_integrity(self) -> None:
        counts: dict[bytes, int] = {}
        for h in self._held_hashes:
            assert h in self._key_of, f"held hash {h!r} has no key"
            key = self._key_of[h]
            counts[key] = counts.get(key, 0) + 1
        assert counts == self._held, "held key counts disagree with the held hashes"
        assert len(self._held_hashes) <= self.max_blocks, "more blocks held than max_blocks"
        assert len(self._key_of) <= max(self.max_hashes, len(self._held_hashes)), "map unbounded"
