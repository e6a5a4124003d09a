"""Position-independent chunk reuse: RoPE re-rotation of stored keys and selective recompute
(first-k tokens per chunk, or CacheBlend-style top deviation tokens) over layer callables."""
