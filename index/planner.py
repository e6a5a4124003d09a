"""Context planning: the order to send a request's pieces in so that what is cached gets hit.

A request is a list of segments (system prompt, documents, tool outputs, history, question),
each ``fixed`` (stays where it is), ``movable`` (may be reordered among the movable segments
between two fixed ones) or ``droppable`` (movable, and removed when an earlier kept segment
has the same tokens: a tool output repeated across agent turns is sent once).

Prefix hits depend on the order: block keys chain over the concatenated tokens
(index/hashing.py), and segments need not align with blocks. The planner walks the prompt
from its start, carrying the last full block's key and the partial block after it; at each
movable group it searches, depth first, the order of candidates that extends the stored prefix
the furthest (a candidate whose first new block misses costs one hash and is not explored;
the search is bounded, keeping its best path), then appends the rest.
The rest keeps the caller's relevance order (``rank``, then given order). Every segment is
then labelled: ``prefix`` (all its tokens inside the stored prefix), ``chunk`` (its tokens
are a stored position-independent chunk: blend reuses it anywhere) or ``compute``.

Batch planning sends requests that share segments one after another and orders each
request's segments to continue the longest planned sequence of an earlier request, then the
most shared segments first, so requests sharing documents share prefixes.

Pure functions over ``stored`` (the prefix tree's membership) and ``chunk_hit``; callers own
all returned values.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from index.hashing import ROOT_KEY, chunk_key

FIXED, MOVABLE, DROPPABLE = "fixed", "movable", "droppable"
KINDS = {"f": FIXED, "m": MOVABLE, "d": DROPPABLE}


@dataclass(frozen=True)
class Segment:
    tokens: np.ndarray  # uint32 token ids
    kind: str = FIXED
    rank: int | None = None  # relevance, lower first, for the part the cache does not order

    @classmethod
    def of(cls, tokens: Sequence[int] | np.ndarray, kind: str = FIXED, rank: int | None = None):
        return cls(np.asarray(tokens, dtype=np.uint32), kind, rank)


@dataclass(frozen=True)
class SegmentPlan:
    index: int  # into the request's segments
    start: int  # token offset in the planned prompt
    num_tokens: int
    source: str  # "prefix" | "chunk" | "compute"
    cached_tokens: int


@dataclass(frozen=True)
class Plan:
    order: list[int]  # indices of the segments to send, in order (duplicates left out)
    segments: list[SegmentPlan]  # in planned order
    dropped: list[int]
    prefix_tokens: int  # tokens of the planned prompt inside the stored prefix
    chunk_tokens: int  # tokens in segments a stored chunk covers (blend)
    num_tokens: int


@dataclass(frozen=True)
class BatchPlan:
    order: list[int]  # request indices in the order to send them
    groups: list[list[int]]  # requests sharing their planned prefix, in send order
    plans: list[Plan]  # per request (input order)


class _Walk:
    """The planned prompt so far: the last full block's key, the tokens after it. Once a block
    misses, nothing later can be a prefix hit, so nothing more is hashed."""

    def __init__(self, stored: Container[bytes], seed: int, block_tokens: int) -> None:
        self.stored, self.seed, self.step = stored, seed, 4 * block_tokens
        self.parent, self.tail = ROOT_KEY, b""
        self.matching = True  # every full block so far is stored
        self.hit_tokens = 0

    def probe(self, parent: bytes, tail: bytes, data: bytes) -> tuple[int, tuple | None]:
        """Tokens of ``data`` (uint32 LE) that extend the stored prefix when appended after
        ``(parent, tail)``, and the state after it when all of its full blocks hit."""
        step = self.step
        first = tail + data[: step - len(tail)]  # most candidates miss right here
        if len(first) < step or xxhash.xxh3_128_digest(parent + first, self.seed) not in (
            self.stored
        ):
            return 0, None
        view = memoryview(tail + data)
        hit = 0
        full = len(view) - len(view) % step
        for off in range(0, full, step):
            parent = xxhash.xxh3_128_digest(parent + view[off : off + step], self.seed)
            if parent not in self.stored:
                return max(0, off - len(tail)) // 4, None
            hit = off + step
        return max(0, hit - len(tail)) // 4, (parent, bytes(view[full:]))

    def search(self, left: list[int], data: list[bytes], negated: dict, budget: int) -> list[int]:
        """The order of some of ``left`` that extends the stored prefix the furthest. The tree
        rarely branches, so only candidates whose first block hits are explored, depth
        first; past ``budget`` probes the search keeps the best path found so far."""
        probes = [0]

        def best(parent: bytes, tail: bytes, rest: list[int]) -> tuple[int, list[int]]:
            found: tuple[int, list[int]] = (0, [])
            hits = []
            for i in rest:
                probes[0] += 1
                gain, state = self.probe(parent, tail, data[i])
                if gain:
                    hits.append((gain, negated[i], i, state))
            for gain, _, i, state in sorted(hits, reverse=True):
                total, path = gain, [i]
                if state is not None and probes[0] < budget:
                    more, after = best(*state, [j for j in rest if j != i])
                    total, path = gain + more, [i, *after]
                if total > found[0]:
                    found = (total, path)
            return found

        return best(self.parent, self.tail, left)[1] if self.matching else []

    def append(self, data: bytes) -> None:
        if not self.matching:
            return
        view = memoryview(self.tail + data)
        step = self.step
        full = len(view) - len(view) % step
        for off in range(0, full, step):
            self.parent = xxhash.xxh3_128_digest(self.parent + view[off : off + step], self.seed)
            if self.parent not in self.stored:
                self.matching = False
                return
            self.hit_tokens += step // 4
        self.tail = bytes(view[full:])


def _check(segments: Sequence[Segment]) -> None:
    for i, seg in enumerate(segments):
        if seg.kind not in (FIXED, MOVABLE, DROPPABLE):
            raise ValueError(f"segment {i}: kind must be fixed, movable or droppable")


def plan(
    segments: Sequence[Segment],
    stored: Container[bytes],
    chunk_hit: Callable[[bytes], bool],
    seed: int,
    block_tokens: int,
    priority: Callable[[int], tuple] | None = None,
) -> Plan:
    """Plan one request. ``priority(i)`` orders the uncached movable remainder (default: rank,
    then given order)."""
    _check(segments)
    data = [s.tokens.astype("<u4", copy=False).tobytes() for s in segments]
    content = [chunk_key(s.tokens, seed) for s in segments]
    kept, dropped, seen = [], [], set()
    for i, seg in enumerate(segments):
        if seg.kind == DROPPABLE and content[i] in seen:
            dropped.append(i)
            continue
        seen.add(content[i])
        kept.append(i)
    if priority is None:

        def priority(i: int) -> tuple:
            rank = segments[i].rank
            return (rank is None, rank if rank is not None else 0, i)

    negated = {i: tuple(-x for x in priority(i)) for i in kept}  # sorted(reverse) keeps rank
    walk = _Walk(stored, seed, block_tokens)
    order: list[int] = []
    group: list[int] = []

    def flush() -> None:
        left = list(group)
        for i in walk.search(left, data, negated, budget=64 * max(1, len(left))):
            left.remove(i)
            walk.append(data[i])
            order.append(i)
        for i in sorted(left, key=priority):
            walk.append(data[i])
            order.append(i)
        group.clear()

    for i in kept:
        if segments[i].kind == FIXED:
            flush()
            walk.append(data[i])
            order.append(i)
        else:
            group.append(i)
    flush()
    return _label(segments, order, dropped, content, walk.hit_tokens, chunk_hit)


def _label(segments, order, dropped, content, hit_tokens, chunk_hit) -> Plan:
    out, start, chunk_tokens = [], 0, 0
    for i in order:
        n = len(segments[i].tokens)
        covered = max(0, min(n, hit_tokens - start))
        if n and covered == n:
            source, cached = "prefix", n
        elif n and chunk_hit(content[i]):
            source, cached = "chunk", n
            chunk_tokens += n - covered
        else:
            source, cached = "compute", covered
        out.append(SegmentPlan(i, start, n, source, cached))
        start += n
    return Plan(order, out, dropped, min(hit_tokens, start), chunk_tokens, start)


def plan_batch(
    requests: Sequence[Sequence[Segment]],
    stored: Container[bytes],
    chunk_hit: Callable[[bytes], bool],
    seed: int,
    block_tokens: int,
) -> BatchPlan:
    """Plan N pending requests together so that they share prefixes with each other.

    Requests are clustered bottom up: the two clusters whose common movable segments are
    most (ties: the earlier pair) merge, and their common segments become a level above
    what each member had; a request's segment order is its levels from the top down (within a
    level, most shared overall first), so each cluster's members share its common segments
    as a prefix. The send order walks the clusters, largest first, members of a merge one
    after another; the groups are the top clusters. Each request's own plan still follows
    what is stored first, then this order."""
    share: dict[bytes, int] = {}
    first_seen: dict[bytes, int] = {}
    contents, sets = [], []
    for segs in requests:
        _check(segs)
        keys = [chunk_key(s.tokens, seed) for s in segs]
        contents.append(keys)
        movable = [k for k, s in zip(keys, segs, strict=True) if s.kind != FIXED]
        for k in movable:
            first_seen.setdefault(k, len(first_seen))
        sets.append(frozenset(movable))
        for k in sets[-1]:
            share[k] = share.get(k, 0) + 1
    groups, levels = _cluster(sets)
    order = [r for g in groups for r in g]
    plans: list[Plan | None] = [None] * len(requests)
    for r in range(len(requests)):
        sequence: list[bytes] = []
        for level in [*reversed(levels[r]), sets[r]]:
            placed = set(sequence)
            sequence += sorted(level - placed, key=lambda k: (-share[k], first_seen[k]))
        position = {k: j for j, k in enumerate(sequence)}

        def priority(i: int, keys=contents[r], position=position) -> tuple:
            return (position.get(keys[i], len(position)), i)

        plans[r] = plan(requests[r], stored, chunk_hit, seed, block_tokens, priority)
    return BatchPlan(order, groups, plans)


_MAX_CLUSTERED = 1024  # pairwise intersections are O(n^2); more requests keep their order


def _cluster(sets: list[frozenset]) -> tuple[list[list[int]], list[list[frozenset]]]:
    """Agglomerative clustering by common segments: (top clusters' members, largest first;
    per request its common-segment levels, lowest first)."""
    n = len(sets)
    levels: list[list[frozenset]] = [[] for _ in range(n)]
    if n > _MAX_CLUSTERED:
        return [[r] for r in range(n)], levels
    common = dict(enumerate(sets))
    members = {i: [i] for i in range(n)}
    heap = [(-len(sets[a] & sets[b]), a, b) for a in range(n) for b in range(a + 1, n)]
    heap = [h for h in heap if h[0] < 0]
    heapq.heapify(heap)
    next_id = n
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in common or b not in common:
            continue  # merged already
        shared = common.pop(a) & common.pop(b)
        merged = members.pop(a) + members.pop(b)
        for r in merged:
            levels[r].append(shared)
        for other, theirs in common.items():
            size = len(shared & theirs)
            if size:
                heapq.heappush(heap, (-size, other, next_id))
        common[next_id], members[next_id] = shared, merged
        next_id += 1
    tops = sorted(members.values(), key=lambda m: (-len(m), m[0]))
    return tops, levels
