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
