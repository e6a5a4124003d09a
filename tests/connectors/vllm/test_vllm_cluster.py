"""Two hosts share KV through a real Redis Cluster: host A's vLLM engine stores a prompt
through its own service, host B's fresh engine, beside another service with its own arena and
disk, hits it from the cluster — token-identical to an engine without any cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.connectors.vllm.engines import BLOCK_TOKENS, run_engine, start_llm_service
from tests.processes import start_redis_cluster

pytestmark = [pytest.mark.vllm, pytest.mark.redis, pytest.mark.timeout(600)]


def test_host_b_hits_what_host_a_stored_through_the_cluster(tiny_llama, tmp_path: Path):
    prompt = np.random.default_rng(41).integers(3, 480, 4 * BLOCK_TOKENS + 9).tolist()
    spec = {"model": tiny_llama.path, "prompts": [prompt], "max_tokens": 6}
    ref = run_engine(spec, tmp_path / "ref.log")["outputs"][0]["tokens"]
    cluster = start_redis_cluster(tmp_path / "cluster")
    try:
        extra = ["--redis-url", cluster.url, "--redis-mode", "cluster"]
        host_a = start_llm_service(tmp_path / "a", extra)
        stored = run_engine(spec | {"url": host_a.url}, tmp_path / "a.log")
        assert stored["worker"]["saved_blocks"] == 4
        assert host_a.stop() == 0, host_a.output()  # drains A's write-down into the cluster
        host_b = start_llm_service(tmp_path / "b", extra)
        hit = run_engine(spec | {"url": host_b.url}, tmp_path / "b.log")
        out = hit["outputs"][0]
        assert out["cached"] == 4 * BLOCK_TOKENS, "B must load A's 4 blocks from the cluster"
        assert out["tokens"] == ref
        host_b.stop()
    finally:
        cluster.stop()
