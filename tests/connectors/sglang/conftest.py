"""Fixtures for the SGLang backend tests (helpers: pools.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from connectors.sglang import CacheServiceHiCacheStorage
from tests.connectors.sglang.pools import HostPool, make_config


@pytest.fixture
def make_backend() -> Iterator[Callable[..., tuple[CacheServiceHiCacheStorage, HostPool]]]:
    """Build the backend the way SGLang's cache controller does: the real
    ``StorageBackendFactory.create_backend("dynamic", ...)``, then ``register_mem_pool_host``."""
    made: list[CacheServiceHiCacheStorage] = []

    def make(
        url: str, layout: str = "page_first", pool: HostPool | None = None, **config
    ) -> tuple[CacheServiceHiCacheStorage, HostPool]:
        pool = pool or HostPool(layout)
        cfg = make_config(url, is_page_first_layout=pool.layout == "page_first", **config)
        backend = StorageBackendFactory.create_backend("dynamic", cfg, pool)
        assert isinstance(backend, HiCacheStorage)
        backend.register_mem_pool_host(pool)
        made.append(backend)
        return backend, pool

    yield make
    for backend in made:
        backend.close()
