"""Run one vLLM engine on CPU in this process and print its results as one JSON line.

Tests start it as a subprocess (vLLM state does not reset in-process)::

    python -m tests.connectors.vllm.engine_run '{"model": ..., "prompts": [[...], ...]}'

Spec keys: model, prompts (token id lists, generated one after another), max_tokens,
url (absent: no connector), extra (kv_connector_extra_config), prefix_caching,
block_size, kv_cache_bytes, max_model_len, kv_events (kv_events_config fields: endpoint,
replay_endpoint, topic); before / after: {"i": path} to wait for a file
before prompt i / create it after prompt i (to interleave two engines); batch: true to send
all prompts in one generate call, with ``started`` a file created right before it.
Output line: ``RESULT {"outputs": [{"tokens", "cached", "total_s", "connector_s"}], "worker":
{stats}}``; ``connector_s``: time spent inside the connector's hooks during that prompt.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def make_llm(
    spec: dict,
    connector: str = "CacheServiceConnector",
    module: str = "connectors.vllm",
    **engine_args,
):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kv = None
    if spec.get("url"):
        extra = {"url": spec["url"], **spec.get("extra", {})}
        kv = KVTransferConfig(
            kv_connector=connector,
            kv_connector_module_path=module,
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    if spec.get("kv_events"):  # vLLM publishes its cache's KV events over ZMQ
        from vllm.config import KVEventsConfig

        events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", **spec["kv_events"])
        engine_args.setdefault("kv_events_config", events)
        engine_args.setdefault("prefix_caching_hash_algo", "sha256_cbor")
    return LLM(
        spec["model"],
        dtype=spec.get("dtype", "float32"),
        block_size=spec.get("block_size", 32),
        kv_cache_memory_bytes=spec.get("kv_cache_bytes", 64 << 20),
        max_model_len=spec.get("max_model_len", 1024),
        enable_prefix_caching=spec.get("prefix_caching", False),
        enforce_eager=True,
        kv_transfer_config=kv,
        seed=0,
        **engine_args,
    )


def connector_worker():
    """This engine's connector worker side; None without a connector."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    return getattr(get_kv_transfer_group(), "_worker", None)


def loaded_blocks() -> int:
    """Blocks this engine's connector loaded so far (loads are synchronous: no flush)."""
    worker = connector_worker()
    return worker.stats.get("loaded_blocks", 0) if worker is not None else 0


def worker_stats() -> dict:
    worker = connector_worker()
    if worker is None:
        return {}
    if hasattr(worker, "flush"):
        worker.flush()  # saves commit off the step: count them once they landed
    return {
        **worker.stats,
        "namespace": worker.ns.to_dict(),
        "block_bytes": worker.layout.block_bytes,
    }


def wait_for(path: str | None, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while path and not os.path.exists(path):
        assert time.monotonic() < deadline, f"gave up waiting for {path}"
        time.sleep(0.05)


def run(spec: dict) -> dict:
    from vllm import SamplingParams

    from connectors.vllm.base import hook_seconds

    llm = make_llm(spec)
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0, ignore_eos=True)
    outputs = []
    if spec.get("batch"):
        if spec.get("started"):
            open(spec["started"], "w").close()
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params,
                            use_tqdm=False)  # fmt: skip
        total = time.perf_counter() - start
        for out in outs:
            outputs.append(
                {
                    "tokens": list(out.outputs[0].token_ids),
                    "cached": out.num_cached_tokens or 0,
                    "total_s": total,
                }  # fmt: skip
            )
        return {"outputs": outputs, "worker": worker_stats()}
    for i, prompt in enumerate(spec["prompts"]):
        wait_for(spec.get("before", {}).get(str(i)))
        hooks, loaded = hook_seconds(), loaded_blocks()
        start = time.perf_counter()
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        total = time.perf_counter() - start
        outputs.append(
            {
                "tokens": list(out.outputs[0].token_ids),
                "cached": out.num_cached_tokens or 0,
                "total_s": total,
                "connector_s": hook_seconds() - hooks,
                "loaded_blocks": loaded_blocks() - loaded,
            }
        )
        # a line per prompt as it finishes: a test may kill the engine before its RESULT
        print(f"OUTPUT{i} " + json.dumps(outputs[-1]), flush=True)
        if str(i) in spec.get("after", {}):
            worker = connector_worker()
            if worker is not None and hasattr(worker, "flush"):
                worker.flush()  # another engine reads these blocks next: let them land
            open(spec["after"][str(i)], "w").close()
    return {"outputs": outputs, "worker": worker_stats()}


if __name__ == "__main__":
    result = run(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
