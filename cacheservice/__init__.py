"""cacheservice: a context-reuse KV cache service for LLM inference engines."""

__version__ = "0.1.0"
