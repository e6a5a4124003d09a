"""The prefix tree: one node per stored block, found by key in O(1) and matched by depth.

Chained keys make the tree prefix-closed: block i of a prompt sits at depth i + 1 under block
i - 1. ``match`` therefore binary-searches the first key whose node is missing or at the wrong
depth (O(log n) dict probes) and then proves the whole path with two C-speed passes (parent
identity), falling back to a plain walk when a caller broke the chain. See index/base.py for
the contract (stubs, pins, LRU order).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from operator import attrgetter

from index.base import DEFAULT_TIER_ORDER, MatchResult
from index.hashing import KEY_BYTES, ROOT_KEY

_FASTEST = attrgetter("fastest")
_PARENT = attrgetter("parent")


def _first_failing(n: int, holds: Callable[[int], bool]) -> int:
    """The first i in [0, n) where ``holds`` fails, n if none, for a ``holds`` that is true
    up to some point and false after it (depth along a chain): O(log n) calls."""
    if n == 0 or holds(n - 1):
        return n
    lo, hi = -1, n - 1  # holds(lo) (virtually for -1), not holds(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(mid):
            lo = mid
        else:
            hi = mid
    return hi


class Node:
    __slots__ = ("key", "parent", "children", "depth", "tiers", "pins", "last_used", "length")
    __slots__ += ("fastest",)

    def __init__(self, key: bytes, parent: Node | None, depth: int) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[bytes, Node] = {}
        self.depth = depth
        self.tiers: set[str] = set()
        self.pins = 0
        self.last_used = 0
        self.length = 0
        self.fastest = ""

    def __repr__(self) -> str:
        return f"Node({self.key.hex()[:8]}, depth={self.depth}, tiers={sorted(self.tiers)})"


class PrefixTree:
    def __init__(self, tier_order: Sequence[str] = DEFAULT_TIER_ORDER) -> None:
        self._rank = {name: i for i, name in enumerate(tier_order)}
        self._root = Node(ROOT_KEY, None, 0)
        self._nodes: dict[bytes, Node] = {}  # real nodes and stubs
        self._stubs: set[bytes] = set()
        self._lru: dict[str, OrderedDict[bytes, int]] = {}  # key -> tick placed, oldest first
        self._tick = 0
        # Told (key, parent key or None at the root, tier, held) each time a tier starts or
        # stops holding a block: what the service publishes as KV events. Must not mutate us.
        self.on_tier: Callable[[bytes, bytes | None, str, bool], None] | None = None

    # -- queries ----------------------------------------------------------------------------

    def get(self, key: bytes) -> Node | None:
        """The real node of ``key`` (read only), or None (absent or a stub)."""
        node = self._nodes.get(key)
        return node if node is not None and node.tiers else None

    def __contains__(self, key: bytes) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return len(self._nodes) - len(self._stubs)

    def blocks_in(self, tier: str) -> int:
        return len(self._lru.get(tier, ()))

    def keys_in(self, tier: str) -> list[bytes]:
        """Keys ``tier`` holds, least recently used first."""
        return list(self._lru.get(tier, ()))

    def present(self, keys: Iterable[bytes]) -> list[bool]:
        return [self.get(k) is not None for k in keys]

    def match_length(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys`` are a stored prefix, by binary search alone (O(log n) index
        probes, no per-key pass): exact for chained keys (each names its whole prefix). A
        list that is no chain may be over- or under-counted; ``match`` checks every edge, and
        is what anything that pins or reads must use."""
        n = len(keys)
        get = self._nodes.get

        def at_depth(i: int) -> bool:
            node = get(keys[i])
            return node is not None and node.depth == i + 1 and bool(node.tiers)

        return _first_failing(n, at_depth)

    def match(self, keys: Sequence[bytes]) -> MatchResult:
        n = len(keys)
        if n == 0:
            return MatchResult(0, [])
        get = self._nodes.get

        def at_depth(i: int) -> bool:
            node = get(keys[i])
            return node is not None and node.depth == i + 1

        h = _first_failing(n, at_depth)
        if h == 0:
            return MatchResult(0, [])
        nodes = list(map(get, keys[:h]))
        # Every node's parent is the previous one: keys[:h] is a real path from the root (or
        # from a chunk's stub). A key list that is no chain (a client may send anything) can
        # fool the binary search: then nodes hold gaps, and the plain walk decides.
        if None not in nodes and list(map(_PARENT, nodes[1:])) == nodes[:-1]:
            return MatchResult(h, list(map(_FASTEST, nodes)))
        return self._walk(keys)

    def _walk(self, keys: Sequence[bytes]) -> MatchResult:
        first = self.get(keys[0]) if keys else None
        if first is None or first.depth != 1:
            return MatchResult(0, [])
        node, tiers = first, [first.fastest]
        for key in keys[1:]:
            node = node.children.get(key)
            if node is None:
                break
            tiers.append(node.fastest)
        return MatchResult(len(tiers), tiers)

    # -- mutation ---------------------------------------------------------------------------

    def insert(self, parent_key: bytes, key: bytes, tier: str, length: int) -> bool:
        """Record that ``tier`` holds block ``key`` whose parent is ``parent_key`` (ROOT_KEY for
        a prompt's first block, a chunk key for a chunk's first block). An unknown parent
        becomes a stub; a known block just gains the tier.

        Returns False, changing nothing, when the edge would break the tree: a block that is
        its own parent or the root, or a parent inside the block's own subtree (a cycle).
        Callers hold input from clients and disks, which may say anything."""
        if len(key) != KEY_BYTES or len(parent_key) != KEY_BYTES:
            return False
        if key == parent_key or key == ROOT_KEY:
            return False
        node = self._nodes.get(key)
        if node is not None and node.tiers:
            self._add_tier(node, tier)
            return True
        parent = self._root if parent_key == ROOT_KEY else self._nodes.get(parent_key)
        if node is not None:
            # ``node`` is a stub: its subtree re-attaches below ``parent``, which therefore
            # must not lie inside that subtree.
            if parent is not None and self._is_ancestor(node, parent):
                return False
            if parent is None:
                parent = self._stub(parent_key)
            self._stubs.discard(key)
            node.parent = parent
            parent.children[key] = node
            self._set_depths(node, parent.depth + 1)
        else:
            if parent is None:
                parent = self._stub(parent_key)
            node = Node(key, parent, parent.depth + 1)
            parent.children[key] = node
            self._nodes[key] = node
        node.length = length
        self._add_tier(node, tier)
        return True

    def add_tier(self, key: bytes, tier: str) -> None:
        node = self.get(key)
        if node is None:
            raise KeyError(f"block {key.hex()} is not in the index: insert() it first")
        self._add_tier(node, tier)

    def _add_tier(self, node: Node, tier: str) -> None:
        if self.on_tier is not None and tier not in node.tiers:
            parent = node.parent
            self.on_tier(node.key, None if parent is self._root else parent.key, tier, True)
        node.tiers.add(tier)
        self._refresh_fastest(node)
        self._tick += 1
        node.last_used = self._tick
        lru = self._lru.setdefault(tier, OrderedDict())
        lru[node.key] = self._tick
        lru.move_to_end(node.key)

    def remove_tier(self, key: bytes, tier: str) -> None:
        """``tier`` no longer holds ``key``. A node left with no tier drops if it is a leaf,
        else becomes a stub (its descendants stay indexed)."""
        node = self.get(key)
        if node is None or tier not in node.tiers:
            return
        node.tiers.discard(tier)
        del self._lru[tier][key]
        if self.on_tier is not None:
            self.on_tier(key, None, tier, False)
        self._refresh_fastest(node)
        if node.tiers:
            return
        parent = node.parent
        del parent.children[key]
        if node.children:
            node.parent = None
            self._stubs.add(key)
            self._set_depths(node, 0)
        else:
            del self._nodes[key]
            node.parent = None
        self._drop_stub_if_empty(parent)

    def pin(self, keys: Iterable[bytes], touch: bool = True) -> list[Node]:
        """Pin the real nodes of ``keys``; returns them as handles for ``unpin_nodes`` (safe even
        if a node leaves the index meanwhile). ``touch`` refreshes their LRU position."""
        nodes = [n for n in map(self.get, keys) if n is not None]
        for node in nodes:
            node.pins += 1
        if touch:
            self._touch_nodes(nodes)
        return nodes

    def unpin_nodes(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            assert node.pins > 0, f"{node} unpinned more often than pinned"
            node.pins -= 1
            if node.key in self._stubs:
                self._drop_stub_if_empty(node)

    def unpin(self, keys: Iterable[bytes]) -> None:
        self.unpin_nodes(n for n in map(self._nodes.get, keys) if n is not None and n.pins > 0)

    def touch(self, keys: Sequence[bytes]) -> None:
        self._touch_nodes([n for n in map(self.get, keys) if n is not None])

    def evict_candidates(self, tier: str, count: int, copy_down: bool = False) -> list[bytes]:
        """Up to ``count`` unpinned blocks whose ``tier`` copy may go, in the order they should:
        least recently used first, where a block held only in ``tier`` with children goes only
        after them (removing it would orphan them). The plan counts its own removals: a parent
        whose last child it takes becomes a candidate at its own (older) place, so one old
        prompt goes tail to head before a newer prompt loses its tail.
        ``copy_down``: the caller first copies a last copy to a lower tier, so an internal
        block held only in ``tier`` is a candidate too (it goes only once it is copied)."""
        out: list[bytes] = []
        lru = self._lru.get(tier)
        if count <= 0 or not lru:
            return out
        nodes, root = self._nodes, self._root
        taken: set[bytes] = set()
        gone: dict[bytes, int] = {}  # block -> children this plan removes from the index
        freed: list[tuple[int, bytes]] = []  # parents the plan made leaves, by their tick

        def may_go(node: Node) -> bool:
            if node.pins or node.key in taken:
                return False
            return copy_down or len(node.tiers) > 1 or len(node.children) <= gone.get(node.key, 0)

        def take(node: Node) -> None:
            out.append(node.key)
            taken.add(node.key)
            parent = node.parent
            if copy_down or len(node.tiers) > 1 or parent is None or parent is root:
                return  # the block stays indexed (another tier holds it): no parent freed
            gone[parent.key] = gone.get(parent.key, 0) + 1
            if parent.key in lru and may_go(parent):
                heapq.heappush(freed, (lru[parent.key], parent.key))

        for key, tick in lru.items():
            while freed and freed[0][0] < tick and len(out) < count:
                if (k := heapq.heappop(freed)[1]) not in taken:
                    take(nodes[k])
            if len(out) >= count:
                break
            if may_go(node := nodes[key]):
                take(node)
                if len(out) >= count:
                    break
        while freed and len(out) < count:
            if (k := heapq.heappop(freed)[1]) not in taken:
                take(nodes[k])
        return out

    # -- internals --------------------------------------------------------------------------

    def _touch_nodes(self, nodes: list[Node]) -> None:
        # Leaf first, so that ancestors end up more recent than their descendants.
        self._tick += 1
        tick, lru = self._tick, self._lru
        for node in sorted(nodes, key=attrgetter("depth"), reverse=True):
            node.last_used = tick
            for tier in node.tiers:
                lru[tier][node.key] = tick
                lru[tier].move_to_end(node.key)

    def _refresh_fastest(self, node: Node) -> None:
        rank = self._rank
        node.fastest = min(node.tiers, key=lambda t: (rank.get(t, len(rank)), t), default="")

    def _stub(self, key: bytes) -> Node:
        node = self._nodes.get(key)
        if node is None:
            node = Node(key, None, 0)
            self._nodes[key] = node
            self._stubs.add(key)
        return node

    def _drop_stub_if_empty(self, node: Node) -> None:
        if node.key in self._stubs and not node.children and node.pins == 0:
            self._stubs.discard(node.key)
            del self._nodes[node.key]

    def _is_ancestor(self, node: Node, other: Node | None) -> bool:
        # Terminates: insert never creates a cycle, so every parent chain ends.
        while other is not None:
            if other is node:
                return True
            other = other.parent
        return False

    @staticmethod
    def _set_depths(top: Node, depth: int) -> None:
        top.depth = depth
        stack = [top]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                child.depth = node.depth + 1
                stack.append(child)

    def check_integrity(self) -> None:
        resident: dict[str, set[bytes]] = {}
        for key, node in self._nodes.items():
            assert node.key == key, f"{node} filed under {key.hex()}"
            assert node.pins >= 0, f"{node} has {node.pins} pins"
            if key in self._stubs:
                assert node.parent is None and node.depth == 0, f"stub {node} is attached"
                assert not node.tiers, f"stub {node} holds tiers"
                assert node.children or node.pins, f"stub {node} is empty"
            else:
                assert node.tiers, f"{node} is held by no tier"
                parent = node.parent
                assert parent is not None, f"{node} has no parent"
                assert parent.children.get(key) is node, f"{node} missing from its parent"
                assert parent is self._root or self._nodes.get(parent.key) is parent
                assert node.depth == parent.depth + 1, f"{node} depth != parent depth + 1"
                for tier in node.tiers:
                    resident.setdefault(tier, set()).add(key)
            for ckey, child in node.children.items():
                assert child.parent is node and self._nodes.get(ckey) is child, f"{child} stray"
            rank = self._rank
            fastest = min(node.tiers, key=lambda t: (rank.get(t, len(rank)), t), default="")
            assert node.fastest == fastest, f"{node} fastest {node.fastest!r} != {fastest!r}"
        for child in self._root.children.values():
            assert child.parent is self._root and child.depth == 1
        assert self._stubs <= self._nodes.keys(), "stub set names unknown nodes"
        for tier, lru in self._lru.items():
            assert set(lru) == resident.get(tier, set()), f"LRU of {tier} != its residents"
            ticks = list(lru.values())
            assert ticks == sorted(ticks), f"LRU of {tier} is out of order"
            assert all(self._nodes[k].last_used >= t for k, t in lru.items()), "stale last_used"
        assert resident.keys() <= self._lru.keys(), "a tier holds nodes but has no LRU"
