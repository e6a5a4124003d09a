"""SGLang HiCache storage backend (L3) backed by cacheservice.

Loaded by ``--hicache-storage-backend dynamic`` (launch line: examples/sglang_launch.sh).
SGLang builds it as ``cls(storage_config, kwargs)`` and then calls
``register_mem_pool_host``; only then is the page size, dtype and layout known, so the
namespace is registered lazily on first use and again whenever the service forgot it.

A page is the ordered list of host-pool buffers SGLang names for it: ``get_page_buffer_meta``
(``interface_v1``: K/V per page in page_first, K/V per layer in layer_first) or one flat tensor
(``get``/``set``). The two orders differ in layer_first, so each path has its own namespace
(layout tag ``sglang:<layout>:v1|flat``) and can never read the other's bytes. SGLang's keys
are already chained strings; each maps to ``xxh3_128(key, seed=namespace)``.

Failure policy: the service being down, slow or refusing a call makes reads misses, writes
False and exists 0; nothing raises into SGLang's storage threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import xxhash
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from cacheservice.client import CacheClient
from cacheservice.errors import BadRequest, CacheServiceError, UnknownNamespace
from connectors.settings import ExtraSettings
from connectors.sglang.transport import ArenaTransport, HttpTransport, Page, Segment, Transport
from index.hashing import ROOT_KEY, Namespace

logger = logging.getLogger(__name__)

V1, FLAT = "v1", "flat"


@dataclass(frozen=True)
class Settings(ExtraSettings):
    """The backend's keys in ``--hicache-storage-backend-extra-config`` (besides SGLang's
    ``backend_name``/``module_path``/``class_name``/``interface_v1``)."""

    SOURCE = "cacheservice extra_config"
    SGLANG_KEYS = ("backend_name", "module_path", "class_name", "interface_v1")

    url: str = "http://127.0.0.1:8642"
    token: str | None = None
    timeout: float = 2.0
    salt: str = ""
    model: str | None = None  # overrides storage_config.model_name
    zero_copy: str = "auto"  # "auto": map the arena when its file is visible; "on"; "off"
    retry_s: float = 1.0  # after a failed registration, calls are misses for this long

    @classmethod
    def from_sglang(cls, extra: dict | None) -> Settings:
        return cls.from_extra(extra, ignore=cls.SGLANG_KEYS)

    def check(self) -> None:
        if str(self.zero_copy) not in ("auto", "on", "off"):
            raise BadRequest(
                f'extra_config zero_copy={self.zero_copy!r}: use "auto", "on" or "off"'
            )


@dataclass(frozen=True)
class Binding:
    """A registered namespace and the transport that moves its pages."""

    ns: Namespace
    ns_id: str
    transport: Transport


def _tensor_page(t: torch.Tensor) -> tuple[torch.Tensor, Page]:
    """A flat page tensor as one segment; returns the tensor that backs it (keep it alive)."""
    if t.device.type != "cpu":
        raise BadRequest(f"HiCache pages must be host (CPU) tensors, got device {t.device}")
    t = t.contiguous()
    return t, [Segment(t.data_ptr(), t.numel() * t.element_size())]


class CacheServiceHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None):
        self.config = storage_config
        self.settings = Settings.from_sglang(storage_config.extra_config)
        self.interface_v1 = bool((storage_config.extra_config or {}).get("interface_v1", 0))
        self.model = self.settings.model or storage_config.model_name
        if not self.model:
            raise BadRequest(
                "cacheservice needs the model name to namespace keys: SGLang's model_name is "
                'empty, so set extra_config {"model": "<hf id or path>"}'
            )
        self.client = CacheClient(self.settings.url, self.settings.token, self.settings.timeout)
        self.mem_pool_host: Any = None
        self._page_bytes: dict[str, int] = {}
        self._bindings: dict[str, Binding] = {}
        self._arena: ArenaTransport | None = None
        self._retry_at = 0.0
        self._down = False

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        page = mem_pool_host.page_size
        _, sizes = mem_pool_host.get_page_buffer_meta(torch.arange(page, dtype=torch.int64))
        flat = mem_pool_host.get_dummy_flat_data_page()
        self._page_bytes = {V1: int(sum(sizes)), FLAT: flat.numel() * flat.element_size()}
        self._bindings.clear()

    def namespace(self, path: str) -> Namespace:
        """Everything that makes this rank's pages incompatible with another's."""
        cfg, pool = self.config, self.mem_pool_host
        if cfg.is_mla_model:  # KV is replicated over TP ranks (per DCP shard)
            rank, size = cfg.dcp_rank, cfg.dcp_size
        else:
            rank, size = cfg.tp_rank, cfg.tp_size
        salt = (
            f"{self.settings.salt}|pp={cfg.pp_rank}/{cfg.pp_size}"
            f"|cp={cfg.attn_cp_rank}/{cfg.attn_cp_size}"
        )
        return Namespace(
            model=self.model,
            dtype=str(pool.dtype).removeprefix("torch."),
            layout=f"sglang:{pool.layout}:{path}",
            block_tokens=pool.page_size,
            tp_rank=rank,
            tp_size=size,
            salt=salt,
        )

    def _binding(self, path: str) -> Binding | None:
        """The registered namespace for ``path``, registering it now if needed; None while
        the service is unreachable or the host pool is not registered yet (a miss)."""
        bound = self._bindings.get(path)
        if bound is not None or self.mem_pool_host is None or time.monotonic() < self._retry_at:
            return bound
        ns = self.namespace(path)
        try:
            info = self.client.register(ns, self._page_bytes[path])
            transport = self._transport(info.arena)
        except CacheServiceError as e:
            self._retry_at = time.monotonic() + self.settings.retry_s
            self._failed("register", e)
            return None
        bound = self._bindings[path] = Binding(ns, info.ns, transport)
        return bound

    def _transport(self, arena: dict) -> Transport:
        mode = self.settings.zero_copy
        if mode != "off" and self._arena is None:
            try:
                self._arena = ArenaTransport(self.client, arena["path"])
            except CacheServiceError as e:
                if mode == "on":
                    raise
                logger.info("cacheservice arena %s not mapped (%s): using HTTP", arena["path"], e)
        if mode != "off" and self._arena is not None:
            return self._arena
        return HttpTransport(self.client)

    def _failed(self, what: str, e: CacheServiceError) -> None:
        if isinstance(e, UnknownNamespace):
            self._bindings.clear()  # the service restarted empty: register again
        if not self._down:
            logger.warning("cacheservice %s failed (%s); treating as a miss", what, e)
        self._down = True

    def _keys(self, bound: Binding, keys: list[str]) -> list[bytes]:
        seed = bound.ns.seed
        return [xxhash.xxh3_128_digest(k.encode(), seed) for k in keys]

    def _parent(self, bound: Binding, extra_info: HiCacheStorageExtraInfo | None) -> bytes:
        prefix = extra_info.prefix_keys if extra_info is not None else None
        return self._keys(bound, prefix[-1:])[0] if prefix else ROOT_KEY

    def _v1_pages(self, host_indices: torch.Tensor, n: int) -> list[Page]:
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        assert len(ptrs) == len(sizes) and len(ptrs) % n == 0, "one buffer set per page"
        per = len(ptrs) // n
        segs = [Segment(int(p), int(s)) for p, s in zip(ptrs, sizes, strict=True)]
        return [segs[i * per : (i + 1) * per] for i in range(n)]

    def _call(self, what: str, path: str, keys: list[str], move: Callable, default: Any) -> Any:
        """Run ``move(binding, hashed keys)``; any service failure is ``default`` (a miss)."""
        bound = self._binding(path) if keys else None
        if bound is None:
            return default
        try:
            out = move(bound, self._keys(bound, keys))
        except CacheServiceError as e:
            self._failed(what, e)
            return default
        self._down = False
        return out

    def _read(self, path: str, keys: list[str], pages: list[Page]) -> int:
        def move(b: Binding, hashed: list[bytes]) -> int:
            return b.transport.read(b.ns_id, hashed, pages)

        return self._call("read", path, keys, move, 0)

    def _write(
        self, path: str, keys: list[str], pages: list[Page], extra: HiCacheStorageExtraInfo | None
    ) -> list[bool]:
        if not self.config.is_storage_writer:  # an MLA replica: rank 0 of its shard writes
            return [True] * len(keys)

        def move(b: Binding, hashed: list[bytes]) -> list[bool]:
            return b.transport.write(b.ns_id, hashed, self._parent(b, extra), pages)

        return self._call("write", path, keys, move, [False] * len(keys))

    def _exists(self, keys: list[str]) -> int:
        def move(b: Binding, hashed: list[bytes]) -> int:
            return self.client.exists(b.ns_id, hashed)

        return self._call("exists", V1 if self.interface_v1 else FLAT, keys, move, 0)

    # ---- HiCacheStorage: zero-copy path (interface_v1) --------------------------------------

    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        if not keys or self.mem_pool_host is None:
            return [False] * len(keys)
        count = self._read(V1, keys, self._v1_pages(host_indices, len(keys)))
        return [i < count for i in range(len(keys))]

    def batch_set_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        if not keys or self.mem_pool_host is None:
            return [False] * len(keys)
        return self._write(V1, keys, self._v1_pages(host_indices, len(keys)), extra_info)

    # ---- HiCacheStorage: flat-tensor path ---------------------------------------------------

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None):
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None):
        if self.mem_pool_host is None:
            return [None] * len(keys)
        if target_locations is None:
            target_locations = [None] * len(keys)
        targets = [
            t if t is not None else self.mem_pool_host.get_dummy_flat_data_page()
            for t in target_locations
        ]
        backing = [_tensor_page(t) for t in targets]
        count = self._read(FLAT, keys, [page for _, page in backing])
        for target, (tensor, _) in zip(targets[:count], backing, strict=False):
            if tensor is not target:  # a non-contiguous target was filled through a copy
                target.copy_(tensor)
        return targets[:count] + [None] * (len(keys) - count)

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes=None):
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations=None, sizes=None):
        if values is None or len(values) != len(keys):
            raise BadRequest("batch_set needs one flat page tensor per key")
        backing = [_tensor_page(v) for v in values]
        return all(self._write(FLAT, keys, [page for _, page in backing], None))

    # ---- HiCacheStorage: existence ------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self._exists([key]) == 1

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        return self._exists(keys)

    def clear(self) -> None:
        """No-op: the service is shared with other engines; flush it through its admin API."""

    def close(self) -> None:
        if self._arena is not None:
            self._arena.close()
            self._arena = None
        self._bindings.clear()
        self.client.close()
