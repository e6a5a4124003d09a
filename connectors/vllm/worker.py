"""Worker half of the vLLM connector: copies whole KV blocks between the engine's paged KV
cache and the service's shared-memory arena.

A block's payload in the arena is the concatenation of that block's bytes in every attention
layer, in the layer order of the KV cache group, each layer's block copied as opaque bytes
(the CPU backend's transposed key tiles included).

The parts: link.py (the service, its gate and its arena), loads.py (a step's loads,
synchronous and verified, layer by layer on a GPU), saves.py (a step's saves, copied at once
and committed off the step), copies.py / host_copy.py / transfer.py (the copies themselves).
This module binds them to the engine's KV cache and to vLLM's worker-side calls.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from cacheservice.errors import BadRequest
from connectors.vllm.copies import BlockCopier
from connectors.vllm.host_copy import HostCopier
from connectors.vllm.link import ServiceLink
from connectors.vllm.loads import Loader
from connectors.vllm.saves import Saver
from connectors.vllm.scheduler import CacheLayout, CacheServiceMeta, Settings
from connectors.vllm.transfer import prefault


def block_major(cache: torch.Tensor, num_blocks: int, name: str) -> torch.Tensor:
    """The layer's cache with engine blocks on dim 0, as vLLM declares it: a layer view is the
    logical ``[B, H, N, C]`` (``vllm.v1.kv_cache_interface.create_kv_cache_views``), B being
    ``num_blocks`` times the kernel blocks per manager block (``group_kernel_blocks``). The
    axis is never guessed from sizes: another dimension may equal ``num_blocks`` by chance."""
    if cache.dim() < 2 or cache.shape[0] % num_blocks:
        raise BadRequest(
            f"layer {name} cache {tuple(cache.shape)} does not have vLLM's block-major layout "
            f"(dim 0 a multiple of num_blocks={num_blocks}): this vLLM is not supported"
        )
    if cache.shape[0] == num_blocks:
        return cache
    return cache.unflatten(0, (num_blocks, -1))


class WorkerSide:
    def __init__(self, settings: Settings, layout: CacheLayout, tp_rank: int, num_blocks: int):
        self.layout, self.rank, self.num_blocks = layout, tp_rank, num_blocks
        self.link = ServiceLink(settings, layout, tp_rank)
        self.ns = self.link.ns
        self._layer_index = {name: i for i, name in enumerate(layout.layers)}
        # The second thread of a copy or of a verify, while the engine's thread does the rest.
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cs-copy")
        # Commits (spot checksums, a GPU save's full ones, HTTP) and lease releases run here,
        # in order, off the step.
        self._commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cs-commit")
        # A step's reserves, sent before its forward so their answers arrive while it runs.
        self._reserves = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cs-reserve")
        self.stats = {"loaded_blocks": 0, "failed_blocks": 0, "saved_blocks": 0}
        self.stats |= {"load_s": 0.0, "acquire_s": 0.0, "verify_s": 0.0, "copy_in_s": 0.0}
        self.stats |= {"save_s": 0.0, "reserve_s": 0.0, "copy_out_s": 0.0, "commit_s": 0.0}
        self._loads: Loader | None = None  # both set by register_kv_caches
        self._saves: Saver | None = None
        self._unloaded: set[int] = set()  # blocks asked for before any KV cache was registered

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.layout.layers if name not in kv_caches]
        assert not missing, f"KV caches missing for layers {missing}"
        layers = []
        for name in self.layout.layers:
            t = block_major(kv_caches[name], self.num_blocks, name)
            block = t.select(0, 0)
            nbytes = block.numel() * block.element_size()
            if nbytes != self.layout.layer_bytes:
                raise BadRequest(
                    f"layer {name} holds {nbytes} bytes per block, the KV spec says "
                    f"{self.layout.layer_bytes}: this KV cache layout is not supported"
                )
            layers.append(t)
        storages = {t.untyped_storage().data_ptr(): t for t in layers if not t.is_cuda}
        for t in storages.values():
            prefault(t)
        copier = BlockCopier(layers, self.layout.layer_bytes)
        rows = copier.rows_np
        host = None if rows is None else HostCopier(rows, self._helper)
        self.link.pin = layers[0].is_cuda
        self._loads = Loader(self.link, copier, host, self._helper, self._commits, self.stats)
        self._saves = Saver(self.link, copier, host, self._commits, self._reserves, self.stats)

    def start_load_kv(self, meta: CacheServiceMeta) -> None:
        if self._loads is None or self._saves is None:
            # no KV caches were registered: nothing can load (recompute) or be saved
            self._unloaded.update(b for spec in meta.loads for b in spec.block_ids)
            return
        self._saves.prepare(meta.saves)  # the slots come while this step's forward runs
        if meta.loads:
            self._loads.begin(meta.loads)
        else:
            self._loads.finish()

    def wait_for_layer_load(self, layer_name: str) -> None:
        i = self._layer_index.get(layer_name)
        if i is not None and self._loads is not None:
            self._loads.wait_layer(i)

    def get_finished(self) -> set[str] | None:
        return None  # loads are synchronous: done within their step

    def take_load_errors(self) -> set[int]:
        errors, self._unloaded = self._unloaded, set()
        return errors | (self._loads.take_errors() if self._loads is not None else set())

    def wait_for_save(self, meta: CacheServiceMeta) -> None:
        if self._loads is None or self._saves is None:
            return  # nothing registered to copy from: the blocks are not stored
        self._loads.finish()  # the forward has run: every layer landed already
        self._saves.save(meta.saves)

    def flush(self) -> None:
        """Wait until every save handed to the commit thread is committed (or failed)."""
        self._commits.submit(lambda: None).result()

    def close(self) -> None:
        self._reserves.shutdown(wait=True)
        self._commits.shutdown(wait=True)  # committed blocks reach the service before exit
        self._helper.shutdown(wait=True)
        self.link.close()
