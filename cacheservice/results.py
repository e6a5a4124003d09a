"""Result types of the control plane, shared by the service (which builds them) and the
clients (which parse them from the wire): small frozen dataclasses, importable without any
server code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NamespaceInfo:
    ns: str
    seed: int
    block_bytes: int
    arena: dict


@dataclass(frozen=True)
class LookupResult:
    hits: int
    tiers: list[str]


@dataclass(frozen=True)
class GetBlocksResult:
    count: int
    data: bytes
    present: list[bool]


@dataclass(frozen=True)
class AcquireResult:
    """``lease`` is "" when nothing was found (no lease was opened, nothing to release)."""

    lease: str
    slots: list[int]
    checksums: list[int]
    lengths: list[int]


@dataclass(frozen=True)
class ReserveResult:
    """``lease`` is "" when no slot was granted (no lease was opened)."""

    lease: str
    slots: list[int | None]


@dataclass(frozen=True)
class EngineSpec:
    """How to reach one engine's KV events, as its connector registers them."""

    engine: str
    ns: str
    endpoint: str  # vLLM's kv_events_config.endpoint, its '*' replaced by the engine's address
    replay_endpoint: str | None = None
    topic: str = ""
    url: str = ""  # where a router sends this engine's requests (echoed, never dialled)


@dataclass(frozen=True)
class EngineRoute:
    engine: str
    url: str
    connected: bool
    gpu_tokens: int  # already in the engine's own KV cache
    tier_tokens: dict[str, int]  # then loadable from each of the service's tiers
    compute_tokens: int
    cost_s: float


@dataclass(frozen=True)
class RouteResult:
    best: str | None  # None: no connected engine serves this namespace
    num_tokens: int
    engines: list[EngineRoute]
