"""``/v1/plan`` and ``/v1/plan/batch``: index/planner.py over what this service holds.

A request's segments travel as parallel arrays (``tokens``: every segment's uint32 token ids
concatenated, ``lengths``, ``kinds``: one letter per segment, ``f``/``m``/``d``, optional
``ranks``), so a request of hundreds of segments stays within the decoder's container
bounds (protocol.py). Everything is checked before planning; a plan changes no state.
"""

from __future__ import annotations

import numpy as np

from cacheservice.errors import BadRequest, TooLarge
from cacheservice.namespaces import NamespaceRegistry
from index.chunks import ChunkIndex
from index.planner import KINDS, BatchPlan, Plan, Segment, plan, plan_batch
from index.radix import PrefixTree

MAX_SEGMENTS = 4096


def decode_segments(
    tokens: bytes, lengths: list, kinds: str, ranks: list | None, counts: list | None
) -> list[list[Segment]]:
    n = len(lengths)
    if n > MAX_SEGMENTS:
        raise TooLarge(f"{n} segments exceed {MAX_SEGMENTS}: plan fewer at once")
    if len(kinds) != n or (ranks is not None and len(ranks) != n):
        raise BadRequest("kinds (one letter per segment) and ranks must match lengths")
    if any(k not in KINDS for k in kinds):
        raise BadRequest("kinds letters must be f (fixed), m (movable) or d (droppable)")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in lengths):
        raise BadRequest("lengths must be non-negative integers")
    if ranks is not None and not all(
        r is None or (isinstance(r, int) and not isinstance(r, bool)) for r in ranks
    ):
        raise BadRequest("ranks must be integers or nil")
    if len(tokens) % 4 or sum(lengths) != len(tokens) // 4:
        raise BadRequest(
            f"tokens holds {len(tokens) // 4} uint32 ids but lengths add up to {sum(lengths)}"
        )
    ids = np.frombuffer(tokens, dtype="<u4")
    segs, off = [], 0
    for i, length in enumerate(lengths):
        rank = ranks[i] if ranks is not None else None
        segs.append(Segment(ids[off : off + length], KINDS[kinds[i]], rank))
        off += length
    counts = counts if counts is not None else [n]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise BadRequest("requests must list each request's segment count")
    if sum(counts) != n:
        raise BadRequest(f"requests counts add up to {sum(counts)}, not the {n} segments")
    out, off = [], 0
    for c in counts:
        out.append(segs[off : off + c])
        off += c
    return out


def plan_doc(p: Plan) -> dict:
    return {
        "order": p.order,
        "dropped": p.dropped,
        "prefix_tokens": p.prefix_tokens,
        "chunk_tokens": p.chunk_tokens,
        "num_tokens": p.num_tokens,
        "segments": [
            [s.index, s.start, s.num_tokens, s.source, s.cached_tokens] for s in p.segments
        ],  # fmt: skip
    }


class Planning:
    def __init__(self, tree: PrefixTree, chunks: ChunkIndex, namespaces: NamespaceRegistry):
        self.tree, self.chunks, self.namespaces = tree, chunks, namespaces

    def _args(self, ns: str) -> tuple:
        namespace, _ = self.namespaces.get(ns)
        seed = namespace.seed

        def chunk_hit(key: bytes) -> bool:
            entry = self.chunks.get(key, seed)
            return entry is not None and all(self.tree.present(entry.keys))

        return self.tree, chunk_hit, seed, namespace.block_tokens

    def plan(self, ns: str, segments: list[Segment]) -> Plan:
        return plan(segments, *self._args(ns))

    def plan_batch(self, ns: str, requests: list[list[Segment]]) -> BatchPlan:
        return plan_batch(requests, *self._args(ns))
