"""Engine helpers for the vLLM connector tests: a service sized for the tiny model's blocks,
and vLLM engines run as subprocesses (``engine_run`` / ``blend_engine_run``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.processes import ServiceProcess, start_service

REPO = Path(__file__).resolve().parents[3]
BLOCK_TOKENS = 32
# The tiny model's block: 2 layers x (2 kv heads x 32 tokens x 2*32 floats) = 32 KiB.
SLOT_BYTES = 36864


def start_llm_service(
    workdir: Path, extra: list[str] | None = None, wrap: list[str] | None = None
) -> ServiceProcess:
    args = ["--arena-bytes", "8MiB", "--slot-bytes", str(SLOT_BYTES), "--disk-bytes", "64MiB"]
    return start_service(workdir, extra=args + (extra or []), wrap=wrap, unix_socket=bool(wrap))


def start_engine(
    spec: dict,
    log: Path,
    module: str = "tests.connectors.vllm.engine_run",
    wrap: list[str] | None = None,
) -> subprocess.Popen:
    """Start ``module`` (an engine runner) with ``spec`` in a fresh process, output to ``log``
    (run under the ``wrap`` prefix: another network host)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*(wrap or []), sys.executable, "-m", module, json.dumps(spec)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_engine(proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> dict:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"engine failed ({proc.returncode}):\n{text[-6000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def run_engine(
    spec: dict, log: Path, timeout: float = 240.0, wrap: list[str] | None = None
) -> dict:
    """Run ``engine_run`` with ``spec`` in a fresh process; returns its result dict."""
    return wait_engine(start_engine(spec, log, wrap=wrap), log, timeout)


def ask_while_stopped(side, request, proc: subprocess.Popen) -> tuple[list, float]:
    """Ask scheduler ``side`` for ``request``'s matched tokens, step after step, while the
    service ``proc`` is hung (SIGSTOP), until it answers or 2 s pass; asserts no query blocks the
    step loop. Returns the answers and the seconds from the first query to the last answer
    (teardown of the side and the service is not part of it)."""
    proc.send_signal(signal.SIGSTOP)
    try:
        answers, start = [], time.monotonic()
        while time.monotonic() - start < 2.0:
            t = time.monotonic()
            answers.append(side.get_num_new_matched_tokens(request, 0))
            assert time.monotonic() - t < 0.2, "one scheduler query blocked the step loop"
            if answers[-1][0] is not None:
                break
        elapsed = time.monotonic() - start
    finally:
        proc.send_signal(signal.SIGCONT)
    return answers, elapsed
