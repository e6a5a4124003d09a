"""``cacheservice proxy`` in front of a real vLLM OpenAI server (SmolLM2-135M-Instruct on CPU,
our connector storing into a real service): identical answers when nothing may move,
streaming, errors passed through, and a planned reorder that hits what the engine stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.connectors.vllm.engines import start_llm_service
from tests.models import ModelUnavailable, smollm2_dir
from tests.processes import REPO, free_port

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]
SYSTEM = "You answer in one short sentence."
DOCS = [
    "Document: The Eiffel Tower is in Paris and was finished in 1889 for a world fair. It is "
    "made of wrought iron, stands 330 metres tall and was the tallest structure in the world "
    "until 1930. Gustave Eiffel's company designed and built it; millions visit it every year.",
    "Document: Mount Fuji is the tallest mountain in Japan, 3776 metres high, on Honshu near "
    "Tokyo. It is an active volcano that last erupted in 1707. Its nearly symmetrical cone is "
    "snow-capped for much of the year and is a frequent subject of Japanese art and poetry.",
    "Document: The Danube flows through Vienna, Budapest and Belgrade to the Black Sea. It is "
    "the second-longest river in Europe, about 2850 kilometres long, rising in the Black "
    "Forest of Germany and passing through or along the borders of ten countries.",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    try:
        model = str(smollm2_dir())
    except ModelUnavailable as e:
        pytest.skip(str(e))
    work = tmp_path_factory.mktemp("proxy")
    # SmolLM2's block: 30 layers x 2 x 3 heads x 64 dims x 32 tokens x 2 bytes = 720 KiB.
    sizes = ["--arena-bytes", "96MiB", "--slot-bytes", str(740 << 10), "--disk-bytes", "512MiB"]
    svc = start_llm_service(work / "svc", extra=sizes)
    vport, pport = free_port(), free_port()
    kv = {"kv_connector": "CacheServiceConnector", "kv_connector_module_path": "connectors.vllm",
          "kv_role": "kv_both", "kv_connector_extra_config": {"url": svc.url}}  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    vlog = open(work / "vllm.log", "wb")
    vllm = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
         "--port", str(vport), "--block-size", "32", "--max-model-len", "2048",
         "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20), "--dtype", "bfloat16",
         "--no-enable-prefix-caching", "--kv-transfer-config", json.dumps(kv)],
        cwd=REPO, env=env, stdout=vlog, stderr=subprocess.STDOUT)  # fmt: skip
    plog = open(work / "proxy.log", "wb")
    proxy = subprocess.Popen(
        [sys.executable, "-m", "cacheservice", "proxy", "--upstream", f"http://127.0.0.1:{vport}",
         "--port", str(pport), "--service-url", svc.url],
        cwd=REPO, env=env, stdout=plog, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{vport}/v1/models", vllm, work / "vllm.log")
        wait_ready(f"http://127.0.0.1:{pport}/v1/models", proxy, work / "proxy.log")
        yield {"model": model, "vllm": f"http://127.0.0.1:{vport}", "svc": svc,
               "proxy": f"http://127.0.0.1:{pport}", "work": work}  # fmt: skip
    finally:
        for proc in (proxy, vllm):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        vlog.close()
        plog.close()
        svc.stop()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited:\n{log.read_text(errors='replace')[-4000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} never answered:\n{log.read_text(errors='replace')[-4000:]}")


def post(url: str, body: dict | bytes) -> tuple[int, bytes, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def chat(stack, messages, **extra) -> dict:
    body = {"model": stack["model"], "messages": messages, "max_tokens": 12, "temperature": 0}
    return body | extra


def answer(raw: bytes) -> str:
    return json.loads(raw)["choices"][0]["message"]["content"]


def messages(order: list[int], question: str) -> list[dict]:
    docs = [{"role": "user", "content": DOCS[i]} for i in order]
    return [{"role": "system", "content": SYSTEM}, *docs, {"role": "user", "content": question}]


def test_nothing_may_move_so_the_answer_is_the_engines_own(stack) -> None:
    body = chat(stack, messages([0, 1], "Where is the Eiffel Tower?"))
    direct, via = post(stack["vllm"], body), post(stack["proxy"], body)
    assert direct[0] == via[0] == 200
    assert answer(via[1]) == answer(direct[1]) and answer(direct[1])


def test_streams_pass_through_and_add_up_to_the_answer(stack) -> None:
    body = chat(stack, messages([2], "Which sea does the Danube reach?"))
    status, raw, headers = post(stack["proxy"], body | {"stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == answer(post(stack["vllm"], body)[1])


def test_errors_and_malformed_bodies_pass_through(stack) -> None:
    bad_model = chat(stack, messages([0], "Hi")) | {"model": "no-such-model"}
    assert post(stack["proxy"], bad_model)[:2] == post(stack["vllm"], bad_model)[:2]
    garbage = b'{"messages": [ nope'
    direct, via = post(stack["vllm"], garbage), post(stack["proxy"], garbage)
    assert via[0] == direct[0] >= 400
    hinted_bad = chat(stack, messages([0], "Hi")) | {"cacheservice": {"movable": [99]}}
    status, raw, headers = post(stack["proxy"], hinted_bad)
    assert "x-cacheservice-plan" not in headers, "unplannable: untouched"
    assert status == post(stack["vllm"], hinted_bad)[0]


def test_a_planned_reorder_hits_the_order_the_engine_stored(stack) -> None:
    client = stack["svc"].client()
    stores = client.stats()["stores"]
    first = chat(stack, messages([1, 0, 2], "How high is Mount Fuji?"))
    assert post(stack["proxy"], first)[0] == 200  # stored by the connector in this order
    deadline = time.monotonic() + 15
    while client.stats()["stores"] < stores + 6:  # its blocks commit off the engine's step
        assert time.monotonic() < deadline, "the first request's blocks were never stored"
        time.sleep(0.2)
    hits_before = client.stats()["hits"]
    asked = chat(stack, messages([0, 1, 2], "Which city has the Eiffel Tower?"),
                 cacheservice={"movable": [1, 2, 3]})  # fmt: skip
    status, raw, headers = post(stack["proxy"], asked)
    plan = json.loads(headers.get("x-cacheservice-plan", "null"))
    assert status == 200 and plan is not None, headers
    assert plan["order"] == [0, 2, 1, 3, 4], plan
    assert plan["prefix_tokens"] >= 6 * 32, "system + the three documents as stored"
    assert client.stats()["hits"] >= hits_before + 6, "the engine loaded the planned hit"
    planned = chat(stack, messages([1, 0, 2], "Which city has the Eiffel Tower?"))
    assert answer(raw) == answer(post(stack["vllm"], planned)[1])
