"""SGLang HiCache storage backend backed by cacheservice (backend.py), moving pages through the
shared-memory arena or HTTP bodies (transport.py). SGLang loads it as
``module_path="connectors.sglang"``, ``class_name="CacheServiceHiCacheStorage"``."""

from connectors.sglang.backend import CacheServiceHiCacheStorage, Settings

__all__ = ["CacheServiceHiCacheStorage", "Settings"]
