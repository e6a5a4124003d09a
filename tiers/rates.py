"""Read bandwidth per tier, learnt from the reads the stack really does (for routing costs).

Each tier's rate is an exponentially weighted mean of bytes per second over its recent reads;
until a tier has been read, its rate is the default it was seeded with (a startup probe for
the host arena, a configured guess below it) and ``measured`` says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

DEFAULT_RATES = {"host": 8e9, "disk": 1e9, "redis": 5e8}  # bytes/s before any measurement
_ALPHA = 0.2


@dataclass
class Rate:
    bytes_per_s: float
    measured: bool = False
    reads: int = 0


class ReadRates:
    def __init__(self, defaults: dict[str, float] | None = None) -> None:
        self._rates = {name: Rate(bps) for name, bps in (defaults or DEFAULT_RATES).items()}

    def observe(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        bps = nbytes / seconds
        rate = self._rates.setdefault(tier, Rate(bps))
        rate.bytes_per_s = (
            bps if not rate.measured else (1 - _ALPHA) * rate.bytes_per_s + _ALPHA * bps
        )
        rate.measured = True
        rate.reads += 1

    def seconds(self, tier: str, nbytes: int) -> float:
        rate = self._rates.get(tier)
        bps = (
            rate.bytes_per_s
            if rate is not None
            else min(r.bytes_per_s for r in self._rates.values())
        )
        return nbytes / bps

    def snapshot(self) -> dict[str, dict]:
        return {name: vars(rate).copy() for name, rate in self._rates.items()}

    def probe_memcpy(self, tier: str = "host", nbytes: int = 16 << 20) -> float:
        """Seed ``tier`` with this machine's memcpy bandwidth (best of three copies)."""
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            np.copyto(dst, src)
            best = min(best, time.perf_counter() - t)
        self.observe(tier, nbytes, best)
        return nbytes / best
