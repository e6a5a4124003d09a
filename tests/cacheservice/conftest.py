"""A real cacheservice subprocess (``python -m cacheservice serve``) on a free port with a tmp
arena and disk dir, plus factories for namespaces, keys and block payloads.

Other test packages may import ``start_service`` from here to run the service beside an engine.
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from index.hashing import Namespace, prefix_keys
from tests.processes import (  # noqa: F401  (re-exported for other test packages)
    REPO,
    SLOT_BYTES,
    ServiceProcess,
    free_port,
    start_service,
)

BLOCK_TOKENS = 16
BLOCK_BYTES = 1024
_names = itertools.count()


def make_namespace(**overrides) -> Namespace:
    """A namespace no other test uses (distinct model name)."""
    fields = {"model": f"test-model-{os.getpid()}-{next(_names)}", "dtype": "bfloat16"}
    fields |= {"layout": "NHD", "block_tokens": BLOCK_TOKENS}
    return Namespace(**(fields | overrides))


def make_keys(ns: Namespace, n: int, seed: int = 0) -> list[bytes]:
    """Prefix keys of n full blocks of pseudo-random tokens."""
    tokens = np.random.default_rng(seed).integers(0, 50_000, n * ns.block_tokens)
    return prefix_keys(tokens, ns.seed, ns.block_tokens)


def make_blocks(n: int, block_bytes: int = BLOCK_BYTES, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed + 1_000_003)
    return [rng.integers(0, 256, block_bytes, dtype=np.uint8).tobytes() for _ in range(n)]
