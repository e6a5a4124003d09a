"""Real parts for the blend connector tests: a 4-layer tiny random Llama (with 2 layers the
top-ratio selection at layer 1 would recompute every K/V and prove nothing), a service whose
slots hold its chunk blocks, and a runner for blend_engine_run subprocesses."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.connectors.vllm.engines import start_engine, wait_engine
from tests.connectors.vllm.tiny_model import TinyLlama, make_tiny_llama
from tests.processes import ServiceProcess, start_service

NUM_LAYERS = 4
# Largest chunk block (the llama2.c model): 4 layers x K,V x 32 tokens x 4 kv heads x 32 dims
# x 4 bytes = 128 KiB; the random model's is 64 KiB.
SLOT_BYTES = 128 * 1024 + 4096


def make_blend_llama(path: Path) -> TinyLlama:
    return make_tiny_llama(str(path), num_layers=NUM_LAYERS)


def start_blend_service(workdir: Path) -> ServiceProcess:
    extra = ["--arena-bytes", "16MiB", "--slot-bytes", str(SLOT_BYTES), "--disk-bytes", "64MiB"]
    return start_service(workdir, extra=extra)


def make_tokens(n: int, rng: np.random.Generator) -> list[int]:
    return rng.integers(3, 480, n).tolist()


def run_blend_engine(spec: dict, log: Path, timeout: float = 240.0) -> dict:
    """Run ``blend_engine_run`` with ``spec`` in a fresh process; returns its result dict."""
    proc = start_engine(spec, log, "tests.connectors.vllm.blend_engine_run")
    return wait_engine(proc, log, timeout)
