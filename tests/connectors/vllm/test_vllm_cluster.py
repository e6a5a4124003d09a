"""Two hosts share KV through a real Redis Cluster: host A's vLLM engine stores a prompt
through its own service, host B's fresh engine, beside another service with its own arena and
disk on another network host, hits it from the cluster — token-identical to an engine without
any cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.connectors.vllm.engines import BLOCK_TOKENS, run_engine, start_llm_service
from tests.netns import make_hosts
from tests.processes import start_redis_cluster

pytestmark = [pytest.mark.vllm, pytest.mark.redis, pytest.mark.timeout(600)]


def test_two_network_hosts_share_kv_through_the_cluster(tiny_llama, tmp_path: Path):
    """Each host a network namespace of its own (own loopback, one veth link): its service and
    its engine run there and reach only the cluster, bound on the link's far side. Where
    namespaces cannot be made (not root), separate arenas and disks on one loopback."""
    prompt = np.random.default_rng(43).integers(3, 480, 3 * BLOCK_TOKENS + 5).tolist()
    spec = {"model": tiny_llama.path, "prompts": [prompt], "max_tokens": 6}
    ref = run_engine(spec, tmp_path / "ref.log")["outputs"][0]["tokens"]
    with make_hosts(2, fallback=True) as (a, b):
        cluster = start_redis_cluster(tmp_path / "cluster", host=a.gateway)
        try:
            extra = ["--redis-url", cluster.url, "--redis-mode", "cluster"]
            host_a = start_llm_service(tmp_path / "a", extra, wrap=a.wrap)
            stored = run_engine(spec | {"url": host_a.url}, tmp_path / "a.log", wrap=a.wrap)
            assert stored["worker"]["saved_blocks"] == 3
            assert host_a.stop() == 0, host_a.output()
            host_b = start_llm_service(tmp_path / "b", extra, wrap=b.wrap)
            hit = run_engine(spec | {"url": host_b.url}, tmp_path / "b.log", wrap=b.wrap)
            out = hit["outputs"][0]
            assert out["cached"] == 3 * BLOCK_TOKENS, "B must load A's 3 blocks from the cluster"
            assert out["tokens"] == ref
            assert host_b.stop() == 0, host_b.output()
        finally:
            cluster.stop()
