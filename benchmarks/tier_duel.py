"""Measuring a tier against its raw baseline: the alternating best-of-N duel, the result row
and the table that judges each row against its target ratio."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from tiers.base import BlockMeta

GIB = 1 << 30


@dataclass(frozen=True)
class Row:
    tier: str
    op: str
    gibps: float
    baseline: str
    base_gibps: float
    target: float | None  # minimum ratio, None = informational

    @property
    def ratio(self) -> float:
        return self.gibps / self.base_gibps


async def duel(
    reps: int, ours: Callable[[], Awaitable[float]], base: Callable[[], float], nbytes: int
) -> tuple[float, float]:
    """GiB/s of the fastest of ``reps`` runs of each, alternating them so that load from other
    processes hits both alike. Each function times itself and returns seconds."""
    t_ours, t_base = [], []
    for _ in range(reps):
        t_base.append(base())
        t_ours.append(await ours())
    return nbytes / min(t_ours) / GIB, nbytes / min(t_base) / GIB


def make_items(n: int, size: int) -> tuple[np.ndarray, list[tuple[BlockMeta, memoryview]]]:
    src = np.random.default_rng(0).integers(0, 256, n * size, dtype=np.uint8)
    view = memoryview(src)
    items = []
    for i in range(n):
        payload = view[i * size : (i + 1) * size]
        items.append(
            (BlockMeta.for_payload(1, i.to_bytes(16, "little"), bytes(16), payload), payload)
        )
    return src, items


def report(rows: list[Row], size: int) -> bool:
    print(f"\nblock payload {size / (1 << 20):g} MiB")
    print(
        f"{'tier':6} {'operation':34} {'GiB/s':>7}  {'baseline':36} {'GiB/s':>7} {'ratio':>6}  "
        "target"
    )
    ok = True
    for row in rows:
        verdict = (
            "info"
            if row.target is None
            else (f"{'PASS' if row.ratio >= row.target else 'FAIL'} >= {row.target}x")
        )
        ok &= row.target is None or row.ratio >= row.target
        print(
            f"{row.tier:6} {row.op:34} {row.gibps:7.2f}  {row.baseline:36} {row.base_gibps:7.2f} "
            f"{row.ratio:5.2f}x  {verdict}"
        )
    return ok
