"""Engines' KV events into the index, our tiers' events out, and routing over both: a real
service process following vLLM's own ZmqEventPublisher (tests/vllm_events.py), encoded and
decoded by vLLM's own msgspec classes."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from cacheservice.errors import BadRequest, UnknownNamespace
from cacheservice.kv_events import END_SEQ, Cleared, Removed, Stored, decode_batch, encode_batch
from cacheservice.results import EngineSpec
from index.hashing import prefix_keys
from tests.factories import BLOCK_BYTES, BLOCK_TOKENS, make_namespace
from tests.processes import ServiceProcess, free_port, start_service, wait_until
from tests.vllm_events import VllmEvents, start_vllm_events

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(180)]
BT = BLOCK_TOKENS
BOUND_S = 3.0  # a route reflects an engine's change (or its death) within this


@pytest.fixture(scope="module")
def vllm_events() -> Iterator[VllmEvents]:
    helper = start_vllm_events()
    yield helper
    helper.stop()


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = start_service(tmp_path_factory.mktemp("events-svc"))
    yield service
    service.stop()


def prompt(n_blocks: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n_blocks * BT).tolist()


def engine_hashes(tag: str, n: int) -> list[bytes]:
    """vLLM's hashes for the blocks: opaque to us (32 bytes, like sha256_cbor's)."""
    return [f"{tag}:{i}".encode().ljust(32, b".") for i in range(n)]


def gpu_tokens(client, ns: str, keys: list[bytes]) -> dict[str, int]:
    return {e.engine: e.gpu_tokens for e in client.route(ns, keys).engines}


def wait_for(check, what: str, bound: float = BOUND_S) -> float:
    return wait_until(check, bound, f"not within {bound} s: {what}", interval=0.02)


def engine(client, vllm_events: VllmEvents, name: str, ns, replay: bool = True) -> None:
    endpoint, replay_endpoint = vllm_events.open(name, replay=replay)
    assert client.register_engine(EngineSpec(name, ns.id, endpoint, replay_endpoint, url=name))
    wait_for(lambda: _connected(client, name), f"{name} connected")


def _connected(client, name: str) -> bool:
    return any(e["engine"] == name and e["connected"] for e in client.engines())


def test_vllm_decodes_what_we_publish_and_we_decode_what_vllm_publishes(vllm_events) -> None:
    ours = encode_batch(3.5, [Stored([b"k" * 16], None, [], 0, "CPU", ownership="host",
                                     locality="LOCAL"), Removed([b"k" * 16], "STORAGE"),
                              Cleared()])  # fmt: skip
    seen = vllm_events.ask(op="decode", payload=ours.hex())["batch"]
    assert seen[0] == 3.5 and [e["type"] for e in seen[1]] == ["BlockStored", "BlockRemoved",
                                                               "AllBlocksCleared"]  # fmt: skip
    assert seen[1][0]["medium"] == "CPU" and seen[1][0]["ownership"] == "host"
    events = [{"type": "stored", "hashes": ["aa" * 32], "tokens": [1, 2, 3], "block_size": 3,
               "parent": "bb" * 32, "extra_keys": [["salt"]]},
              {"type": "removed", "hashes": ["aa" * 32]}, {"type": "cleared"}]  # fmt: skip
    theirs = bytes.fromhex(vllm_events.ask(op="encode", ts=1.0, events=events)["payload"])
    batch = decode_batch(theirs)
    stored, removed, cleared = batch.events
    assert stored.hashes == [b"\xaa" * 32] and stored.parent == b"\xbb" * 32
    assert stored.token_ids == [1, 2, 3] and stored.block_size == 3 and stored.extra
    assert removed.hashes == [b"\xaa" * 32] and removed.medium == "GPU" and cleared == Cleared()


def test_route_names_the_engine_holding_each_prefix_then_the_tiers(svc, vllm_events) -> None:
    client, ns = svc.client(), make_namespace()
    client.register(ns, BLOCK_BYTES)
    engine(client, vllm_events, "r1", ns)
    engine(client, vllm_events, "r2", ns)
    a, b = prompt(3, seed=1), prompt(3, seed=2)
    ka, kb = prefix_keys(a, ns.seed, BT), prefix_keys(b, ns.seed, BT)
    vllm_events.stored("r1", engine_hashes("a", 3), a, BT)
    vllm_events.stored("r2", engine_hashes("b", 2), b[: 2 * BT], BT)
    wait_for(lambda: gpu_tokens(client, ns.id, ka) == {"r1": 3 * BT, "r2": 0}, "A on r1")
    wait_for(lambda: gpu_tokens(client, ns.id, kb) == {"r1": 0, "r2": 2 * BT}, "B on r2")
    route = client.route(ns.id, ka, num_tokens=3 * BT + 5)
    assert route.best == "r1" and route.num_tokens == 3 * BT + 5
    by = {e.engine: e for e in route.engines}
    assert by["r1"].compute_tokens == 5 and by["r2"].compute_tokens == 3 * BT + 5
    assert by["r1"].url == "r1" and by["r1"].cost_s < by["r2"].cost_s
    # The service's host tier holds A: r2 could load it, far cheaper than computing.
    assert client.put_blocks(ns.id, ka, b"\x07" * (3 * BLOCK_BYTES)) == 3
    by = {e.engine: e for e in client.route(ns.id, ka, prefill_tokens_per_s=1000).engines}
    assert by["r2"].tier_tokens == {"host": 3 * BT} and by["r2"].compute_tokens == 0
    assert by["r2"].cost_s < 3 * BT / 1000 / 10
    # An eviction shortens r1's run; clearing the cache empties it.
    vllm_events.removed("r1", engine_hashes("a", 3)[2:])
    wait_for(lambda: gpu_tokens(client, ns.id, ka)["r1"] == 2 * BT, "r1 evicted A's block 3")
    vllm_events.cleared("r1")
    wait_for(lambda: gpu_tokens(client, ns.id, ka)["r1"] == 0, "r1 cleared")


def test_blocks_the_engine_cannot_prove_are_ours_are_never_routed(svc, vllm_events) -> None:
    client, ns = svc.client(), make_namespace()
    client.register(ns, BLOCK_BYTES)
    engine(client, vllm_events, "u1", ns)
    a = prompt(2, seed=3)
    ka = prefix_keys(a, ns.seed, BT)
    vllm_events.stored("u1", engine_hashes("lora", 2), a, BT, lora_name="adapter", lora_id=1)
    vllm_events.stored("u1", engine_hashes("salt", 2), a, BT, extra_keys=[["s"], ["s"]])
    vllm_events.stored("u1", engine_hashes("cpu", 2), a, BT, medium="CPU")
    vllm_events.stored("u1", engine_hashes("size", 1), a, 2 * BT)
    vllm_events.stored("u1", engine_hashes("orphan", 1), a[BT:], BT, parent=b"x" * 32)
    vllm_events.stored("u1", engine_hashes("ok", 1), a[:BT], BT)  # the last one: applied after
    wait_for(lambda: gpu_tokens(client, ns.id, ka)["u1"] == BT, "only the plain block counts")
    info = next(e for e in client.engines() if e["engine"] == "u1")
    assert info["skipped_events"] == 3 and info["unmapped"] == 2 and info["blocks"] == 1


def test_a_lost_batch_is_replayed_within_the_bound_even_without_a_later_one(
    svc, vllm_events
) -> None:
    client, ns = svc.client(), make_namespace()
    client.register(ns, BLOCK_BYTES)
    engine(client, vllm_events, "l1", ns)
    a = prompt(3, seed=4)
    ka, hashes = prefix_keys(a, ns.seed, BT), engine_hashes("l", 3)
    vllm_events.ask(op="lose_next", name="l1")
    vllm_events.stored("l1", hashes, a, BT)  # never reaches the subscriber; the buffer has it
    wait_for(lambda: gpu_tokens(client, ns.id, ka)["l1"] == 3 * BT, "lost store replayed")
    vllm_events.ask(op="lose_next", name="l1")
    vllm_events.removed("l1", hashes[1:])  # a lost removal would leave a stale route
    wait_for(lambda: gpu_tokens(client, ns.id, ka)["l1"] == BT, "lost removal replayed")
    # A gap shown by the next batch is filled by a replay at once.
    vllm_events.ask(op="lose_next", name="l1")
    vllm_events.removed("l1", hashes[:1])
    vllm_events.stored("l1", hashes, a, BT)
    wait_for(lambda: gpu_tokens(client, ns.id, ka)["l1"] == 3 * BT, "gap filled", bound=1.0)
    info = next(e for e in client.engines() if e["engine"] == "l1")
    assert info["replays"] >= 2 and info["resyncs"] == 0


def test_without_a_replay_endpoint_a_gap_forgets_the_engine_rather_than_guess(
    svc, vllm_events
) -> None:
    client, ns = svc.client(), make_namespace()
    client.register(ns, BLOCK_BYTES)
    engine(client, vllm_events, "n1", ns, replay=False)
    a, b = prompt(2, seed=5), prompt(1, seed=6)
    ka, kb = prefix_keys(a, ns.seed, BT), prefix_keys(b, ns.seed, BT)
    vllm_events.stored("n1", engine_hashes("a", 2), a, BT)
    wait_for(lambda: gpu_tokens(client, ns.id, ka)["n1"] == 2 * BT, "A on n1")
    vllm_events.ask(op="lose_next", name="n1")
    vllm_events.removed("n1", engine_hashes("a", 2))
    vllm_events.stored("n1", engine_hashes("b", 1), b, BT)
    wait_for(lambda: gpu_tokens(client, ns.id, kb)["n1"] == BT, "B after the gap")
    assert gpu_tokens(client, ns.id, ka)["n1"] == 0, "A's blocks were removed in the lost batch"


def test_restarted_closed_and_hung_engines_leave_the_routes_within_the_bound(
    svc, vllm_events
) -> None:
    client, ns = svc.client(), make_namespace()
    client.register(ns, BLOCK_BYTES)
    engine(client, vllm_events, "k1", ns)
    a = prompt(2, seed=7)
    ka = prefix_keys(a, ns.seed, BT)

    def hold() -> None:
        vllm_events.stored("k1", engine_hashes("a", 2), a, BT)
        wait_for(lambda: gpu_tokens(client, ns.id, ka)["k1"] == 2 * BT, "A on k1")

    hold()
    vllm_events.reopen("k1")  # restart: same ports, an empty cache, seq from 0
    took = wait_for(lambda: gpu_tokens(client, ns.id, ka)["k1"] == 0, "restart forgotten")
    wait_for(lambda: _connected(client, "k1"), "k1 reconnected")
    hold()  # seq 0 of the new engine is followed, not taken for a duplicate
    # Hung (the whole process stopped): heartbeats time out.
    vllm_events.proc.send_signal(signal.SIGSTOP)
    try:
        hung = wait_for(lambda: gpu_tokens(client, ns.id, ka)["k1"] == 0, "hung engine dropped")
        wait_for(lambda: not _connected(client, "k1"), "hung engine disconnected")
        assert client.route(ns.id, ka).best is None, "a disconnected engine is never best"
    finally:
        vllm_events.proc.send_signal(signal.SIGCONT)
    # Back: the replay from seq 0 rebuilds what the engine still holds.
    wait_for(lambda: gpu_tokens(client, ns.id, ka)["k1"] == 2 * BT, "rebuilt after SIGCONT")
    vllm_events.ask(op="close", name="k1")
    wait_for(lambda: gpu_tokens(client, ns.id, ka)["k1"] == 0, "closed engine forgotten")
    print(f"restart forgotten in {took:.3f} s, hung engine in {hung:.3f} s")


def test_registration_is_validated_idempotent_and_bounded(svc) -> None:
    client, ns = svc.client(), make_namespace()
    client.register(ns, BLOCK_BYTES)
    spec = EngineSpec("v1", ns.id, f"tcp://127.0.0.1:{free_port()}")
    assert client.register_engine(spec) and not client.register_engine(spec)
    for bad in ("tcp://*:5557", "http://x:1", "tcp://host", "inproc://x", "tcp://a:1\x00"):
        with pytest.raises(BadRequest, match="endpoint"):
            client.register_engine(EngineSpec("v2", ns.id, bad))
    with pytest.raises(BadRequest, match="engine id"):
        client.register_engine(EngineSpec("bad id!", ns.id, spec.endpoint))
    with pytest.raises(UnknownNamespace):
        client.register_engine(EngineSpec("v3", "0" * 16, spec.endpoint))
    assert client.unregister_engine("v1") and not client.unregister_engine("v1")
    assert all(e["engine"] != "v1" for e in client.engines())


def test_the_service_publishes_its_tiers_as_vllm_events_with_replay(
    tmp_path: Path, vllm_events
) -> None:
    port, rport = free_port(), free_port()
    extra = ["--events-endpoint", f"tcp://127.0.0.1:{port}"]
    extra += ["--events-replay-endpoint", f"tcp://127.0.0.1:{rport}", "--events-topic", "cs"]
    svc = start_service(tmp_path / "pub", extra=extra)
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"cs")
        sub.connect(f"tcp://127.0.0.1:{port}")
        time.sleep(0.3)  # the subscription reaches the publisher
        client, ns = svc.client(), make_namespace()
        client.register(ns, BLOCK_BYTES)
        keys = prefix_keys(prompt(3, seed=8), ns.seed, BT)
        assert client.put_blocks(ns.id, keys, b"\x01" * (3 * BLOCK_BYTES)) == 3
        seen: list = []
        while not any(isinstance(e, Stored) and e.hashes == [keys[2]] for e in seen):
            assert sub.poll(3000), "no event published"
            topic, seq, payload = sub.recv_multipart()
            assert topic == b"cs"
            seen += decode_batch(payload).events
            vllm_seen = vllm_events.ask(op="decode", payload=payload.hex())["batch"]
            assert len(vllm_seen[1]) == len(decode_batch(payload).events)
        host = [e for e in seen if isinstance(e, Stored) and e.ownership == "host"]
        assert [e.hashes[0] for e in host[:3]] == keys and host[0].parent is None
        assert host[1].parent == keys[0] and host[0].medium == "CPU"
        # A late subscriber replays from seq 0 and gets the same batches.
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{rport}")
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed = []
        while True:
            assert dealer.poll(3000), "replay did not answer"
            frames = dealer.recv_multipart()
            if frames[2] == END_SEQ:
                break
            replayed += decode_batch(frames[3]).events
        dealer.close(linger=0)
        assert [e for e in replayed if isinstance(e, Stored)][:3] == host[:3]
    finally:
        sub.close(linger=0)
        svc.stop()
