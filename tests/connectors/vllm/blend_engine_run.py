"""Run one vLLM CPU engine with the blend connector (or none) and print one JSON result line.

Tests start it as a subprocess::

    python -m tests.connectors.vllm.blend_engine_run '{"model": ..., "requests": [...]}'

Spec keys: model, url (absent: no connector), extra (kv_connector_extra_config), max_tokens,
max_model_len, skip_tokenizer_init (a model directory without a tokenizer), dtype, logprobs
(default -1: the whole vocabulary; None: none, which a large vocabulary makes much faster),
requests: [{"prompt": [ids], "params": kv_transfer_params or absent}], generated one after
another. Each output holds the greedy tokens, vLLM's cached-token count and, per generated
token, the log-probabilities of the whole vocabulary (``logprobs=-1``).
Output line: ``RESULT {"outputs": [{"tokens", "cached", "logprobs"}], "worker": {stats}}``;
the stats say whether the blend model is the engine's own (``engine_weights``).
"""

from __future__ import annotations

import json
import sys

from tests.connectors.vllm import engine_run


def make_llm(spec: dict):
    return engine_run.make_llm(
        spec,
        "CacheServiceBlendConnector",
        "connectors.vllm.blend",
        skip_tokenizer_init=spec.get("skip_tokenizer_init", False),
        max_logprobs=-1,
    )


def served_model(llm):
    """The module vLLM runs, reached through the engine (in-process engine core)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner.model


def worker_stats(llm) -> dict:
    worker = engine_run.connector_worker()
    if worker is None:
        return {}
    blend = worker._model
    # the blend recomputes with the engine's own modules, not a copy of their weights
    own = blend is not None and blend.root is served_model(llm)
    return {**worker.stats, "namespace": worker.shape.ns.to_dict(), "engine_weights": own}


def run(spec: dict) -> dict:
    from vllm import SamplingParams

    llm = make_llm(spec)
    outputs = []
    for req in spec["requests"]:
        extra = {"kv_transfer_params": req["params"]} if req.get("params") else None
        params = SamplingParams(
            max_tokens=spec.get("max_tokens", 4),
            temperature=0,
            ignore_eos=True,
            logprobs=spec.get("logprobs", -1),
            extra_args=extra,
        )
        out = llm.generate({"prompt_token_ids": req["prompt"]}, params, use_tqdm=False)[0]
        gen = out.outputs[0]
        logprobs = []
        for step in gen.logprobs or []:
            dense = [0.0] * len(step)
            for tok, lp in step.items():
                dense[tok] = lp.logprob
            logprobs.append(dense)
        outputs.append(
            {"tokens": list(gen.token_ids), "cached": out.num_cached_tokens or 0,
             "logprobs": logprobs}
        )  # fmt: skip
    return {"outputs": outputs, "worker": worker_stats(llm)}


if __name__ == "__main__":
    result = run(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
