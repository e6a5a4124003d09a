"""Scatter/gather buffer lists after a partial ``writev``/``preadv``/``sendmsg``: the one loop
every vectored I/O call of the tiers shares."""

from __future__ import annotations


def advance(views: list[memoryview], start: int, n: int) -> int:
    """``n`` bytes of ``views[start:]`` were moved: skip the buffers they filled and trim the
    first one they touched, in place. Returns the index of the first buffer with bytes left
    (``len(views)`` when none has)."""
    while start < len(views) and n >= len(views[start]):
        n -= len(views[start])
        start += 1
    if n:
        views[start] = views[start][n:]
    return start
