"""Prefix reuse in vLLM through cacheservice, end to end on one machine (CPU is fine).

    python examples/vllm_prefix_reuse.py [--model PATH] [--url http://127.0.0.1:8642]

Starts a cacheservice (unless --url names a running one), then two separate vLLM engine
processes that share it: the first answers a question about a long shared context and stores
the context's KV; the second, a fresh process, answers another question about the same context
and loads that KV instead of recomputing it. Without --model it builds a small random-weight
Llama locally, so the text is gibberish but the reuse is real.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTEXT = " ".join(
    f"Section {i}: the cache stores keys and values of every block so a prompt seen before is "
    f"not computed again; alpha beta gamma delta {i}."
    for i in range(40)
)
QUESTIONS = ["Question: what does the cache store?", "Question: what is section 7 about?"]


def ask(model: str, url: str, question: str) -> dict:
    """One engine process: its own vLLM, the connector pointing at ``url``."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(
        model,
        kv_transfer_config=KVTransferConfig(
            kv_connector="CacheServiceConnector",
            kv_connector_module_path="connectors.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"url": url},
        ),
        block_size=32,
        kv_cache_memory_bytes=256 << 20,
        max_model_len=4096,
        enable_prefix_caching=False,  # so every cached token below came from cacheservice
        enforce_eager=True,
    )
    start = time.perf_counter()
    out = llm.generate(CONTEXT + "\n" + question, SamplingParams(max_tokens=16, temperature=0))[0]
    return {
        "question": question,
        "answer": out.outputs[0].text,
        "prompt_tokens": len(out.prompt_token_ids),
        "tokens_from_cacheservice": out.num_cached_tokens,
        "seconds": round(time.perf_counter() - start, 3),
    }


def start_service(workdir: Path) -> tuple[subprocess.Popen, str]:
    from cacheservice.client import CacheClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cacheservice", "serve", "--port", str(port)]
    cmd += ["--arena-path", str(workdir / "arena"), "--disk-dir", str(workdir / "disk")]
    cmd += ["--arena-bytes", "256MiB", "--slot-bytes", str(1 << 20)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    with CacheClient(url, timeout=1.0) as probe:
        while not probe.health():
            if proc.poll() is not None:
                raise SystemExit("cacheservice did not start")
            time.sleep(0.1)
    return proc, url


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model id or path (default: build a tiny random Llama)")
    p.add_argument("--url", help="a running cacheservice (default: start one)")
    p.add_argument("--ask", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ask:
        print("RESULT " + json.dumps(ask(*args.ask)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="cs_example_") as tmp:
        model = args.model
        if model is None:
            from tests.connectors.vllm.tiny_model import make_tiny_llama

            model = make_tiny_llama(f"{tmp}/model", num_layers=4, hidden=256, heads=4).path
        service, url = (None, args.url) if args.url else start_service(Path(tmp))
        try:
            for question in QUESTIONS:  # each in a fresh engine process
                env = dict(os.environ, PYTHONPATH=str(REPO))
                cmd = [sys.executable, __file__, "--ask", model, url, question]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
                print(json.dumps(json.loads(line[7:]), indent=2))
        finally:
            if service is not None:
                service.terminate()
                service.wait(timeout=60)


if __name__ == "__main__":
    main()
