"""What an engine must never see from the connector: a livelock on a failing load, a service
that dies mid-batch stalling the batch, KV of other weights or another kernel layout. Real
vLLM CPU engines in subprocesses beside a real service."""

from __future__ import annotations

import shutil
import signal
import statistics
import threading
import time

import numpy as np
import pytest
import torch

from connectors.vllm.identity import weights_fingerprint
from connectors.vllm.worker import block_major
from index.hashing import Namespace, prefix_keys
from tests.connectors.vllm.engines import BLOCK_TOKENS, run_engine, start_engine, wait_engine
from tests.connectors.vllm.tiny_model import make_tiny_llama

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]
MAX_TOKENS = 6


def prompts(n: int, blocks: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 480, blocks * BLOCK_TOKENS + 7).tolist() for _ in range(n)]


def spec(model: str, ps: list[list[int]], url: str | None = None, **kw) -> dict:
    return {"model": model, "prompts": ps, "max_tokens": MAX_TOKENS, "url": url, **kw}


def test_corrupt_first_block_is_recomputed_without_a_livelock(tiny_llama, service, tmp_path):
    (prompt,) = prompts(1, 4, seed=11)
    ref = run_engine(spec(tiny_llama.path, [prompt]), tmp_path / "ref.log")
    store = run_engine(spec(tiny_llama.path, [prompt], service.url), tmp_path / "store.log")
    ns = Namespace.from_dict(store["worker"]["namespace"])
    service.corrupt_arena_copy(ns, store["worker"]["block_bytes"], prefix_keys(prompt, ns.seed, 32))
    start = time.monotonic()
    res = run_engine(spec(tiny_llama.path, [prompt, prompt], service.url), tmp_path / "2.log")
    assert time.monotonic() - start < 120
    assert [o["tokens"] for o in res["outputs"]] == [ref["outputs"][0]["tokens"]] * 2
    # The failing block is reported once per request, not once per scheduler step.
    assert res["worker"]["failed_blocks"] <= 8, res["worker"]


@pytest.mark.parametrize("kill_after_s", [0.0, 0.15])
def test_service_killed_mid_batch_finishes_with_correct_outputs(
    tiny_llama, make_llm_service, tmp_path, kill_after_s
):
    batch = prompts(6, 4, seed=12)
    ref = run_engine(spec(tiny_llama.path, batch, batch=True), tmp_path / "ref.log")
    service = make_llm_service("svc")
    run_engine(spec(tiny_llama.path, batch, service.url, batch=True), tmp_path / "store.log")
    started = tmp_path / "started"
    proc = start_engine(
        spec(tiny_llama.path, batch, service.url, batch=True, started=str(started)),
        tmp_path / "hit.log",
    )

    def kill() -> None:
        while not started.exists():
            time.sleep(0.005)
        time.sleep(kill_after_s)
        service.proc.kill()

    killer = threading.Thread(target=kill)
    killer.start()
    start = time.monotonic()
    res = wait_engine(proc, tmp_path / "hit.log", timeout=120)
    killer.join()
    assert time.monotonic() - start < 90
    assert [o["tokens"] for o in res["outputs"]] == [o["tokens"] for o in ref["outputs"]]


def test_weights_replaced_in_place_never_hit_old_kv(service, tmp_path):
    path = tmp_path / "model"
    make_tiny_llama(str(path), seed=1)
    (prompt,) = prompts(1, 4, seed=13)
    first = run_engine(spec(str(path), [prompt], service.url), tmp_path / "1.log")
    assert first["worker"]["saved_blocks"] == 4
    fp = weights_fingerprint(str(path))
    shutil.rmtree(path)
    make_tiny_llama(str(path), seed=2)  # same path, same shapes and sizes, new weights
    assert weights_fingerprint(str(path)) != fp
    ref = run_engine(spec(str(path), [prompt]), tmp_path / "ref.log")
    again = run_engine(spec(str(path), [prompt], service.url), tmp_path / "2.log")
    assert again["outputs"][0]["cached"] == 0
    assert again["outputs"][0]["tokens"] == ref["outputs"][0]["tokens"]


def test_fingerprint_sees_a_changed_sample_at_equal_size(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = bytearray(np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8))
    (model / "model.safetensors").write_bytes(bytes(data))
    fp = weights_fingerprint(str(model))
    assert weights_fingerprint(str(model)) == fp  # stable
    data[(1 << 20) // 3 + 5] ^= 1
    (model / "model.safetensors").write_bytes(bytes(data))
    assert weights_fingerprint(str(model)) != fp


def test_kernel_layout_is_part_of_the_namespace(monkeypatch):
    """bf16 KV written by the AMX kernels has another in-cache tiling than the vec kernels':
    the two engines get different layout tags, hence different namespaces (0 hits)."""
    from types import SimpleNamespace

    import vllm.v1.attention.backends.cpu_attn as cpu_attn

    from connectors.vllm.identity import vllm_kv_layout_tag

    cfg = SimpleNamespace(cache_config=SimpleNamespace(cache_dtype="auto"))
    kv = SimpleNamespace(dtype=torch.bfloat16, block_size=32, head_size=64)
    tags = {}
    for isa in ("amx", "vec"):
        monkeypatch.setattr(cpu_attn, "_get_attn_isa", lambda *a, isa=isa: isa)
        tags[isa] = vllm_kv_layout_tag(cfg, kv, None)
    assert tags["amx"] != tags["vec"] and "amx" in tags["amx"]
    seeds = {Namespace("m", "bfloat16", t, 32).seed for t in tags.values()}
    assert len(seeds) == 2


def test_block_axis_is_declared_not_guessed():
    # 8 blocks whose second dimension is also 8: the block axis is dim 0, as vLLM declares.
    cache = torch.arange(8 * 8 * 4 * 2, dtype=torch.float32).reshape(8, 8, 4, 2)
    assert block_major(cache, 8, "l").data_ptr() == cache.data_ptr()
    assert torch.equal(block_major(cache, 8, "l")[3], cache[3])
    split = torch.zeros(16, 2, 4, 2)  # 2 kernel blocks per engine block
    assert block_major(split, 8, "l").shape == (8, 2, 2, 4, 2)
    with pytest.raises(Exception, match="block-major"):
        block_major(torch.zeros(5, 8, 4), 8, "l")


@pytest.mark.parametrize("how", ["dead", "hung"])
def test_a_failed_service_costs_a_request_almost_nothing(
    tiny_llama, make_llm_service, tmp_path, how
):
    """After prompt 0 (a hit) the service is killed (dead) or SIGSTOPped (hung). Prompts 1..9
    were stored too, so the scheduler would promise hits: each must instead cost about what a
    plain recompute costs — a dead service <= 5 ms extra per request, a hung one <= 50 ms
    after the first timeout — and answer the same tokens."""
    ps = prompts(10, 4, seed=14)
    ref = run_engine(spec(tiny_llama.path, ps), tmp_path / "ref.log")
    service = make_llm_service("svc")
    run_engine(spec(tiny_llama.path, ps, service.url), tmp_path / "store.log")
    stopped, go = tmp_path / "stopped", tmp_path / "go"
    hit = spec(tiny_llama.path, ps, service.url, after={"0": str(stopped)}, before={"1": str(go)})
    proc = start_engine(hit, tmp_path / "hit.log")

    def fail_service() -> None:
        while not stopped.exists():
            time.sleep(0.005)
        service.proc.send_signal(signal.SIGKILL if how == "dead" else signal.SIGSTOP)
        go.touch()

    failer = threading.Thread(target=fail_service)
    failer.start()
    try:
        res = wait_engine(proc, tmp_path / "hit.log", timeout=180)
    finally:
        failer.join()
        if how == "hung":
            service.proc.send_signal(signal.SIGCONT)
    assert [o["tokens"] for o in res["outputs"]] == [o["tokens"] for o in ref["outputs"]]
    assert res["outputs"][0]["cached"] == 4 * BLOCK_TOKENS  # healthy before the failure
    # Past the first failed call (prompt 1 pays one timeout when hung), requests recompute
    # without touching the service. What the connector adds is the time spent in its hooks
    # (exact, unlike wall-clock differences between two engine processes on a busy VM).
    spent = [o["connector_s"] for o in res["outputs"][2:]]
    budget = 0.005 if how == "dead" else 0.05
    print(how, "connector ms per request:", [round(e * 1e3, 2) for e in spent])
    assert max(spent) <= budget, spent
    extra = [o["total_s"] - r["total_s"] for o, r in zip(res["outputs"][2:], ref["outputs"][2:],
                                                           strict=True)]  # fmt: skip
    # No cost hides outside the hooks: a coarse bound, as two engine processes on a shared
    # 2-core VM differ by tens of ms per request (a 50 ms bound failed under a full suite).
    assert statistics.median(extra) <= 0.1, extra
    # One failed call (the lookup's 0.5 s timeout when hung); the save is not even tried.
    assert res["outputs"][1]["total_s"] < 1.0, res["outputs"][1]
