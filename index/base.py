"""Small result types of the index and the contract the prefix tree keeps.

PrefixTree contract (index/radix.py):
- One global tree over 16-byte block keys; keys embed the namespace seed, so namespaces never
  meet. A node is one stored block: its key, parent, children, depth (1 for the first block
  of a prompt), the set of tier names holding it, a pin count and its last use.
- Only the tree mutates its nodes. Callers own the returned lists and results; they never get
  a live node except through ``get`` (read only).
- A node whose parent is not stored hangs under a *stub* (depth 0, no tiers): chunk keys are
  stubs, and so is a prefix block whose parent was lost. A stub becomes a real node when its
  block is inserted, which re-attaches the subtree below it. Stubs are never matched as hits
  and never evicted; a stub without children and pins disappears.
- A node that loses its last tier is dropped if it is a leaf, else it becomes a stub (its
  subtree stays indexed but cannot be hit as a prefix until the block is stored again).
- Pinned nodes are never eviction candidates: an engine is reading them zero copy.
- LRU: every tier keeps its nodes in use order (oldest first). A touched path is refreshed
  leaf first, so descendants are always older than their ancestors and eviction walks up a
  chain from its leaf instead of scanning past internal nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

# Fastest first. A tier not listed here ranks after all of these.
DEFAULT_TIER_ORDER = ("host", "disk", "redis")


@dataclass(frozen=True)
class MatchResult:
    """Longest stored prefix of a key list: ``length`` blocks, ``tiers[i]`` = the fastest tier
    holding block i."""

    length: int
    tiers: list[str]
