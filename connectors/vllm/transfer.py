"""A GPU step's loads, delivered layer by layer, and a GPU step's saves, on a side stream.

``CudaLayerLoad`` (KV cache on a GPU) enqueues everything at once on a side stream — the
verified slots' payloads host-to-device from the pinned arena (``pin_arena``), then each
layer's scatter into the cache, an event after each — and ``wait(layer)`` makes the compute
stream wait for that layer's event without blocking the host, so the first layers' attention
runs while later layers are still in flight; ``finish()`` returns once every layer is in
(and the arena slots may be released).

A CPU cache loads whole in ``start_load_kv`` (host_copy.py, verified as it copies): its
compute and a copy share the same cores, so loading layer by layer would buy no overlap,
only let a layer's attention run before a later layer's checksum has been seen.
"""

from __future__ import annotations

import ctypes
import logging
import mmap

import torch

from cacheservice.arena import ArenaView
from connectors.vllm.copies import BlockCopier, CopyPlan

log = logging.getLogger("cacheservice.connectors.vllm")


class CudaLayerLoad:
    def __init__(self, copier: BlockCopier, arena: ArenaView, plan: CopyPlan) -> None:
        device = copier.layers[0].device
        self._stream = _side_stream(device)
        self._events: list[torch.cuda.Event] = []
        slots, blocks = plan.pairs()
        if not slots:
            return
        grid = copier.host_slots(arena)  # [num_slots, layers, words], pinned
        with torch.cuda.stream(self._stream):
            staged = torch.empty((len(slots), *grid.shape[1:]), dtype=grid.dtype, device=device)
            for i, slot in enumerate(slots):  # each payload is contiguous in the arena
                staged[i].copy_(grid[slot], non_blocking=True)
            index = torch.tensor(blocks, dtype=torch.long).to(device, non_blocking=True)
            for layer, rows in enumerate(copier.rows):
                rows.index_copy_(0, index, staged[:, layer])
                event = torch.cuda.Event()
                event.record(self._stream)
                self._events.append(event)
        self._keep = staged  # alive until the stream is done with it

    def wait(self, layer: int) -> None:
        if self._events:
            torch.cuda.current_stream().wait_event(self._events[layer])

    def finish(self) -> None:
        if self._events:
            self._events[-1].synchronize()  # the arena slots may be released after this


class CudaSave:
    """Engine blocks -> arena slots on a side stream; ``done()`` (on the commit thread) waits
    for the copies, after which the slots can be hashed and committed."""

    def __init__(self, copier: BlockCopier, arena: ArenaView, plan: CopyPlan) -> None:
        self._stream = _side_stream(copier.layers[0].device)
        self._event = torch.cuda.Event()
        # The forward wrote these blocks on the compute stream: copy only after it has.
        self._stream.wait_stream(torch.cuda.current_stream())
        grid = copier.host_slots(arena)
        slots, blocks = plan.pairs()
        device = copier.layers[0].device
        with torch.cuda.stream(self._stream):
            index = torch.tensor(blocks, dtype=torch.long).to(device, non_blocking=True)
            staged = torch.empty((len(slots), *grid.shape[1:]), dtype=grid.dtype, device=device)
            for layer, rows in enumerate(copier.rows):  # gathered on the device, then one
                staged[:, layer] = rows.index_select(0, index)  # contiguous copy per slot
            for i, slot in enumerate(slots):
                grid[slot].copy_(staged[i], non_blocking=True)
            self._event.record(self._stream)
        self._keep = staged

    def done(self) -> None:
        self._event.synchronize()


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device)
    return _STREAMS[device]


def pin_arena(arena: ArenaView) -> bool:
    """Register the arena's mapping with CUDA (``cudaHostRegister``) so host<->device copies
    are DMA from it, not staged through a bounce buffer. False when CUDA refuses (then copies
    still work, at pageable speed)."""
    view = arena.whole()
    ptr = torch.frombuffer(view, dtype=torch.uint8).data_ptr()
    err = torch.cuda.cudart().cudaHostRegister(ptr, view.nbytes, 0)
    ok = int(err) == 0
    if not ok:
        log.warning("cudaHostRegister of the arena failed (%s): copies are unpinned", err)
    return ok


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def prefault(t: torch.Tensor) -> bool:
    """Back every page of a CPU tensor's memory now, without writing to it. A KV cache that
    vLLM allocated but never wrote (the blocks of a fresh engine) would otherwise fault on the
    first load into each page: 4-5x slower than the copy itself. False where the kernel lacks
    MADV_POPULATE_WRITE (then the first loads pay the faults)."""
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.untyped_storage().nbytes()
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first),
                        _MADV_POPULATE_WRITE) == 0  # fmt: skip
