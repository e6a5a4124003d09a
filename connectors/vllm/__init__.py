"""vLLM connectors backed by cacheservice (``kv_connector_module_path="connectors.vllm"``):
prefix reuse (connector.py: the connector shell in base.py, scheduler.py plans, worker.py
moves KV, identity.py names what makes KV interchangeable) and position-independent reuse
(``connectors.vllm.blend``: blend_scheduler.py, blend_worker.py, kv_layout.py)."""

from connectors.vllm.connector import CacheServiceConnector, CacheServiceMeta

__all__ = ["CacheServiceConnector", "CacheServiceMeta"]
