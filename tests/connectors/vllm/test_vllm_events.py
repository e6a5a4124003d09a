"""Two real vLLM engines publishing KV events (ZMQ, sha256_cbor hashes) beside one service:
the connector registers each engine, the service follows their caches, and a route names
the engine holding a prompt. Sent there, vLLM reports its own prefix-cache hit; sent to the
other engine, the prompt loads from the service. A killed engine leaves the routes within the
bound; restarted on the same ports, it is followed again from an empty cache."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from index.hashing import prefix_keys
from tests.connectors.vllm.engines import BLOCK_TOKENS, start_engine, wait_engine
from tests.connectors.vllm.test_vllm_connector import make_prompt, spec
from tests.processes import free_port, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]
BT = BLOCK_TOKENS
PROMPT_A = make_prompt(4 * BT + 7, seed=21)
PROMPT_B = make_prompt(3 * BT + 3, seed=22)
PROMPT_C = make_prompt(2 * BT + 9, seed=23)
BOUND_S = 3.0


def wait_file(path: Path, proc, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"engine exited:\n{log.read_text(errors='replace')[-4000:]}"
        assert time.monotonic() < deadline, f"engine did not reach {path.name}"
        time.sleep(0.05)


def wait_for(check, what: str, bound: float = BOUND_S) -> float:
    return wait_until(check, bound, f"not within {bound} s: {what}", interval=0.02)


def engine_spec(model: str, url: str, name: str, prompts, ports, before, after) -> dict:
    extra = {"engine_id": name, "engine_url": f"http://{name}", "register_every_s": 0.5}
    events = {"endpoint": f"tcp://*:{ports[0]}", "replay_endpoint": f"tcp://*:{ports[1]}"}
    return spec(model, prompts, url, extra=extra, prefix_caching=True, kv_events=events,
                before=before, after=after)  # fmt: skip


def test_route_follows_two_engines_caches_through_their_kv_events(
    tiny_llama, service, tmp_path: Path
) -> None:
    client = service.client()
    f = {n: tmp_path / n for n in ("a1", "go1", "a2", "never", "b2", "go2", "c3", "never3")}
    ports1, ports2 = (free_port(), free_port()), (free_port(), free_port())
    e1_spec = engine_spec(tiny_llama.path, service.url, "e1", [PROMPT_A, PROMPT_A, PROMPT_C],
                          ports1, {"1": str(f["go1"]), "2": str(f["never"])},
                          {"0": str(f["a1"]), "1": str(f["a2"])})  # fmt: skip
    e2_spec = engine_spec(tiny_llama.path, service.url, "e2", [PROMPT_B, PROMPT_A], ports2,
                          {"1": str(f["go2"])}, {"0": str(f["b2"])})  # fmt: skip
    log1, log2 = tmp_path / "e1.log", tmp_path / "e2.log"
    e1, e2 = start_engine(e1_spec, log1), start_engine(e2_spec, log2)
    try:
        wait_file(f["a1"], e1, log1)
        wait_file(f["b2"], e2, log2)
        engines = wait_registered(client, {"e1", "e2"})
        ns = engines["e1"]["ns"]
        assert engines["e2"]["ns"] == ns, "same model and layout: one namespace"
        seed = int(ns, 16)
        ka, kb = (prefix_keys(p, seed, BT) for p in (PROMPT_A, PROMPT_B))
        kc = prefix_keys(PROMPT_C, seed, BT)

        def gpu(keys) -> dict[str, int]:
            return {e.engine: e.gpu_tokens for e in client.route(ns, keys).engines}

        wait_for(lambda: gpu(ka) == {"e1": 4 * BT, "e2": 0}, "A's 4 blocks on e1")
        wait_for(lambda: gpu(kb) == {"e1": 0, "e2": 3 * BT}, "B's 3 blocks on e2")
        route_a = client.route(ns, ka, num_tokens=len(PROMPT_A))
        assert route_a.best == "e1"
        by = {e.engine: e for e in route_a.engines}
        assert by["e1"].url == "http://e1" and by["e1"].compute_tokens == 7
        # e1's connector stored A: e2 would load it from the service's host tier.
        assert by["e2"].tier_tokens == {"host": 4 * BT}, by["e2"]
        assert client.route(ns, kb).best == "e2"

        f["go1"].touch()  # A to e1: vLLM's own prefix cache
        f["go2"].touch()  # A to e2: loaded from the service
        wait_file(f["a2"], e1, log1)
        res2 = wait_engine(e2, log2)
        # e2 shut down cleanly: its connector unregistered it
        wait_for(lambda: "e2" not in {e["engine"] for e in client.engines()}, "e2 unregistered")
        assert res2["worker"]["loaded_blocks"] == 4, res2["worker"]
        assert res2["outputs"][1]["cached"] == 4 * BT

        e1.send_signal(signal.SIGKILL)
        e1.wait()
        killed = wait_for(lambda: gpu(ka).get("e1", 0) == 0, "killed e1 left the route")
        assert client.route(ns, ka).best is None

        # e1 restarted on the same ports: an empty cache, followed from seq 0 again.
        e3_spec = engine_spec(tiny_llama.path, service.url, "e1", [PROMPT_C, PROMPT_C], ports1,
                              {"1": str(f["never3"])}, {"0": str(f["c3"])})  # fmt: skip
        log3 = tmp_path / "e3.log"
        e3 = start_engine(e3_spec, log3)
        try:
            wait_file(f["c3"], e3, log3)
            wait_for(lambda: gpu(kc).get("e1") == 2 * BT, "C on the restarted e1")
            assert gpu(ka)["e1"] == 0, "the restarted engine holds nothing of A"
        finally:
            e3.kill()
            e3.wait()
        print(f"killed engine left the routes in {killed:.3f} s")
    finally:
        for proc in (e1, e2):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ref = [o["tokens"] for o in res2["outputs"]]
    assert ref[1] == output(log1, 0)["tokens"], "A loaded from the service answers like e1's A"
    again = output(log1, 1)
    assert again["cached"] == 4 * BT, "sent to the engine the route named: vLLM's own hit"
    assert again["loaded_blocks"] == 0, "nothing came from the service"
    assert res2["outputs"][1]["loaded_blocks"] == 4, "the other engine loaded A from it"
    assert again["tokens"] == ref[1]


def wait_registered(client, names: set[str], timeout: float = 30.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        engines = {e["engine"]: e for e in client.engines()}
        if names <= {n for n, e in engines.items() if e["connected"]}:
            return engines
        assert time.monotonic() < deadline, f"engines not registered: {engines}"
        time.sleep(0.1)


def output(log: Path, i: int) -> dict:
    """e1 was killed before printing its result: each answer is in the log as it came."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(f"OUTPUT{i} "):
            return json.loads(line.split(" ", 1)[1])
    raise AssertionError(f"the engine printed no OUTPUT{i} line")
