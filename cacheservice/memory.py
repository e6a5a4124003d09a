"""Process-wide allocator tuning for a service that moves multi-MiB blocks.

glibc serves a request above ``M_MMAP_THRESHOLD`` (128 KiB until its dynamic rule raises it)
with a fresh ``mmap`` and gives it back with ``munmap``, and trims freed heap tops back to the
OS: every block-sized buffer (a disk read, a socket chunk, a Redis value) then page-faults all
its pages again, which costs more than the copy into it. Fixing both thresholds keeps such
buffers on the heap, so freed ones are reused warm. The cost is bounded retained memory: at
most ``_TRIM_BYTES`` of freed heap per malloc arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_BYTES = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit
_TRIM_BYTES = 256 << 20
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Apply the thresholds once; True when applied (glibc), False elsewhere (a no-op)."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _tuned = bool(
                    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)
                )
            except (OSError, AttributeError):
                pass
    return _tuned
