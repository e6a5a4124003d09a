"""What makes two engines' KV interchangeable, beyond the model's name: the weights actually
loaded and the byte layout the attention kernels write.

- Weights: a checkpoint replaced in place (same path, new weights) must not hit the old KV.
  ``weights_fingerprint`` hashes the model directory's config and checkpoint files: name,
  size and four 64 KiB samples of each (start, thirds, end) — milliseconds for any model, and
  a retrained or re-quantized checkpoint differs in every sample. A model named by hub id
  (no local directory) is fingerprinted by its config and revision only.
- Layout: vLLM's CPU backend tiles KV differently per ISA (``amx`` vs ``vec`` vs ``vec16``
  ...), GPU backends differ in block/kv-major order and ``kv_cache_layout``. The layout tag
  names the ISA or backend and the vLLM minor version, so KV written by one kernel is never
  read by another.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import xxhash

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model")
_SAMPLE = 64 << 10


def _sample(path: str, size: int) -> bytes:
    if size <= 4 * _SAMPLE:
        with open(path, "rb") as f:
            return f.read()
    out = bytearray()
    with open(path, "rb") as f:
        for offset in (0, size // 3, 2 * size // 3, size - _SAMPLE):
            out += os.pread(f.fileno(), _SAMPLE, offset)
    return bytes(out)


def files_fingerprint(paths: Iterable[str], root: str) -> str:
    h = xxhash.xxh3_64()
    for path in sorted(paths):
        size = os.path.getsize(path)
        h.update(f"{os.path.relpath(path, root)}\0{size}\0".encode())
        h.update(_sample(path, size))
    return h.hexdigest()


def weights_fingerprint(model: str, revision: str | None = None, config_json: str = "") -> str:
    """16 hex digits naming the weights behind ``model`` (a directory or a hub id)."""
    if os.path.isdir(model):
        paths = []
        for dirpath, _, names in os.walk(model):
            paths += [os.path.join(dirpath, n) for n in names if n.endswith(CHECKPOINT_SUFFIXES)]
        return files_fingerprint(paths, model)
    if os.path.isfile(model):  # a single-file checkpoint (GGUF)
        return files_fingerprint([model], os.path.dirname(model))
    return xxhash.xxh3_64_hexdigest(f"{model}\0{revision}\0{config_json}".encode())


def vllm_kv_layout_tag(vllm_config, spec, kv_cache_layout: str | None) -> str:
    """The kernel layout KV blocks of this engine have in its paged cache."""
    import vllm
    from vllm.platforms import current_platform

    device = current_platform.device_type
    version = ".".join(vllm.__version__.split(".")[:2])
    if device == "cpu":
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        cache_dtype = vllm_config.cache_config.cache_dtype
        kernel = _get_attn_isa(spec.dtype, spec.block_size, spec.head_size, cache_dtype)
    else:
        attention = getattr(vllm_config, "attention_config", None)
        backend = getattr(attention, "backend", None)
        kernel = getattr(backend, "name", None) or str(backend or "auto")
    return f"vllm{version}/{device}/{kernel}/{kv_cache_layout or 'default'}"
