"""The connector inside real vLLM engines on CPU (each engine is its own subprocess) beside a real
cacheservice subprocess. vLLM's own prefix caching is off, so every cached token is a hit
served by the connector; every hit must give the tokens a plain engine gives."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from cacheservice.arena import ArenaView
from index.hashing import Namespace, prefix_keys
from tests.connectors.vllm.engines import (
    BLOCK_TOKENS,
    ask_while_stopped,
    run_engine,
    start_engine,
    wait_engine,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

MAX_TOKENS = 8


def make_prompt(num_tokens: int, seed: int, prefix: list[int] | None = None) -> list[int]:
    rng = np.random.default_rng(seed)
    head = list(prefix or [])
    return head + rng.integers(3, 480, num_tokens - len(head)).tolist()


# 4 full blocks + 28 tokens: the 5th block fills up during decode and must not be saved.
PROMPT_A = make_prompt(4 * BLOCK_TOKENS + 28, seed=1)
# Shares A's first 2 blocks, then differs.
PROMPT_B = make_prompt(3 * BLOCK_TOKENS + 5, seed=2, prefix=PROMPT_A[: 2 * BLOCK_TOKENS])
PROMPT_C = make_prompt(3 * BLOCK_TOKENS + 9, seed=3)


def spec(model: str, prompts: list[list[int]], url: str | None = None, **kw) -> dict:
    return {"model": model, "prompts": prompts, "max_tokens": MAX_TOKENS, "url": url, **kw}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_llama) -> dict[str, list[int]]:
    """Greedy outputs of an engine without the connector."""
    log = tmp_path_factory.mktemp("ref") / "engine.log"
    res = run_engine(spec(tiny_llama.path, [PROMPT_A, PROMPT_B, PROMPT_C]), log)
    tokens = [o["tokens"] for o in res["outputs"]]
    assert all(len(t) == MAX_TOKENS for t in tokens)
    assert all(o["cached"] == 0 for o in res["outputs"])
    return dict(zip("ABC", tokens, strict=False))


def test_store_then_hit_same_and_fresh_engine(tiny_llama, reference, service, tmp_path: Path):
    first = run_engine(spec(tiny_llama.path, [PROMPT_A, PROMPT_A], service.url), tmp_path / "1.log")
    cold, warm = first["outputs"]
    assert cold["cached"] == 0 and cold["tokens"] == reference["A"]
    assert warm["cached"] == 4 * BLOCK_TOKENS, "request 2 must hit A's 4 full blocks"
    assert warm["tokens"] == reference["A"]
    # Only the prompt's 4 full blocks: not its partial tail, not the block decode filled.
    assert first["worker"]["saved_blocks"] == 4
    assert first["worker"]["loaded_blocks"] == 4 and first["worker"]["failed_blocks"] == 0

    fresh = run_engine(spec(tiny_llama.path, [PROMPT_A, PROMPT_B], service.url), tmp_path / "2.log")
    a, b = fresh["outputs"]
    assert a["cached"] == 4 * BLOCK_TOKENS and a["tokens"] == reference["A"]
    assert b["cached"] == 2 * BLOCK_TOKENS and b["tokens"] == reference["B"]
    assert fresh["worker"]["saved_blocks"] == 1, "only B's third block was new"
    with service.client() as client:
        stats = client.stats()
    assert stats["blocks"]["host"] == 5


def test_corrupt_block_is_detected_and_recomputed(tiny_llama, reference, service, tmp_path):
    store = run_engine(spec(tiny_llama.path, [PROMPT_A], service.url), tmp_path / "1.log")
    assert store["worker"]["saved_blocks"] == 4
    ns = Namespace.from_dict(store["worker"]["namespace"])
    keys = prefix_keys(PROMPT_A, ns.seed, BLOCK_TOKENS)
    with service.client() as client:
        acq = client.acquire(ns.id, keys)
        assert len(acq.slots) == 4
        info = client.register(ns, store["worker"]["block_bytes"])
        with ArenaView.open(info.arena["path"]) as arena:
            view = arena.payload(acq.slots[2], acq.lengths[2])
            view[100:108] = bytes(8) if bytes(view[100:108]) != bytes(8) else b"\xff" * 8
            del view
        client.release(acq.lease)

    res = run_engine(spec(tiny_llama.path, [PROMPT_A], service.url), tmp_path / "2.log")
    (out,) = res["outputs"]
    assert out["tokens"] == reference["A"], "a corrupt block must be recomputed, not used"
    assert res["worker"]["loaded_blocks"] == 2, "blocks before the corrupt one still load"
    assert res["worker"]["failed_blocks"] == 2, "the corrupt block and the one after it"


def test_service_down_recomputes(tiny_llama, reference, tmp_path):
    from tests.processes import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = run_engine(spec(tiny_llama.path, [PROMPT_A, PROMPT_A], url), tmp_path / "1.log")
    for out in res["outputs"]:
        assert out["tokens"] == reference["A"] and out["cached"] == 0
    assert res["worker"]["saved_blocks"] == 0


def test_hung_service_neither_hangs_nor_corrupts(tiny_llama, reference, service, tmp_path):
    run_engine(spec(tiny_llama.path, [PROMPT_A], service.url), tmp_path / "store.log")
    service.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
    try:
        extra = {"timeout_s": 1.0, "lookup_timeout_s": 0.5, "retry_s": 30.0}
        res = run_engine(
            spec(tiny_llama.path, [PROMPT_A, PROMPT_C, PROMPT_A], service.url, extra=extra),
            tmp_path / "1.log",
        )
    finally:
        service.proc.send_signal(signal.SIGCONT)
    got = [o["tokens"] for o in res["outputs"]]
    assert got == [reference["A"], reference["C"], reference["A"]]
    assert all(o["cached"] == 0 for o in res["outputs"]), "an unanswered lookup is a miss"
    # One save timeout (1 s) closes the gate; later requests skip the service entirely.
    assert sum(o["total_s"] for o in res["outputs"]) < 6.0


def test_two_engines_share_one_service(tiny_llama, reference, service, tmp_path):
    a_done, c_done = str(tmp_path / "a.done"), str(tmp_path / "c.done")
    first = spec(tiny_llama.path, [PROMPT_A, PROMPT_C], service.url)
    first |= {"after": {"0": a_done}, "before": {"1": c_done}}
    second = spec(tiny_llama.path, [PROMPT_C, PROMPT_A], service.url)
    second |= {"after": {"0": c_done}, "before": {"1": a_done}}
    procs = [
        (start_engine(first, tmp_path / "e1.log"), tmp_path / "e1.log"),
        (start_engine(second, tmp_path / "e2.log"), tmp_path / "e2.log"),
    ]
    (r1, r2) = [wait_engine(p, log) for p, log in procs]
    # Each engine hits what the other stored while both were running.
    assert r1["outputs"][1]["cached"] == 3 * BLOCK_TOKENS
    assert r1["outputs"][1]["tokens"] == reference["C"]
    assert r2["outputs"][1]["cached"] == 4 * BLOCK_TOKENS
    assert r2["outputs"][1]["tokens"] == reference["A"]
    assert r1["outputs"][0]["tokens"] == reference["A"]
    assert r2["outputs"][0]["tokens"] == reference["C"]


def test_lookup_never_blocks_the_step_loop(service, tiny_llama):
    """A hung service: each scheduler query returns within ~lookup_wait_s (None = ask again
    next step) and the lookup becomes a miss at lookup_timeout_s."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    from connectors.vllm.scheduler import CacheLayout, SchedulerSide, Settings

    ns = Namespace(tiny_llama.path, "float32", "test", BLOCK_TOKENS)
    layout = CacheLayout((ns,), 4096, ("l0",), 4096, BLOCK_TOKENS)
    settings = Settings(url=service.url, lookup_wait_s=0.02, lookup_timeout_s=0.4)
    side = SchedulerSide(settings, layout)
    request = Request("r", PROMPT_A, SamplingParams(max_tokens=1), None)
    try:
        answers, elapsed = ask_while_stopped(side, request, service.proc)
    finally:
        side.close()
    assert answers[0] == (None, False) and answers[-1] == (0, False)
    assert 0.3 < elapsed < 1.5, f"the miss came after {elapsed:.2f} s"
