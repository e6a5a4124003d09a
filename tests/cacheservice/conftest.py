"""A real cacheservice subprocess (``python -m cacheservice serve``) on a free port with a tmp
arena and disk dir, plus factories for namespaces, keys and block payloads.

Other test packages may import ``start_service`` from here to run the service beside an engine.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cacheservice.client import CacheClient
from index.hashing import Namespace, prefix_keys

REPO = Path(__file__).resolve().parents[2]
BLOCK_TOKENS = 16
BLOCK_BYTES = 1024
SLOT_BYTES = 4096  # 64-byte header + up to 4032 payload bytes
_names = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceProcess:
    """A running service. ``url`` prefers the unix socket when one is configured."""

    workdir: Path
    args: list[str]
    port: int
    token: str | None = None
    unix_socket: str | None = None
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "service.log"

    @property
    def url(self) -> str:
        return f"unix://{self.unix_socket}" if self.unix_socket else self.http_url

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def arena_path(self) -> str:
        return str(self.workdir / "arena")

    def client(self, **kwargs) -> CacheClient:
        kwargs.setdefault("token", self.token)
        return CacheClient(self.url, **kwargs)

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env = {k: v for k, v in env.items() if not k.startswith("CACHESERVICE_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cacheservice", "serve", *self.args],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        with self.client(timeout=1.0, connect_timeout=0.2) as probe:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited {self.proc.returncode}:\n{self.output()}")
                if probe.health():
                    return self
                time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"service did not become healthy:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the service and wait; returns its exit code."""
        assert self.proc is not None, "service was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def restart(self) -> ServiceProcess:
        assert self.stop() == 0, f"service did not exit cleanly:\n{self.output()}"
        return self.start()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_service(
    workdir: Path,
    *,
    token: str | None = None,
    unix_socket: bool = False,
    extra: list[str] | None = None,
) -> ServiceProcess:
    """Start ``python -m cacheservice serve`` with tiny tiers under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = ["--port", str(port), "--arena-path", str(workdir / "arena")]
    args += ["--arena-bytes", "1MiB", "--slot-bytes", str(SLOT_BYTES)]
    args += ["--disk-dir", str(workdir / "disk"), "--disk-bytes", "16MiB", "--log-level", "info"]
    sock = None
    if unix_socket:
        sock = str(workdir / "cs.sock")
        args += ["--unix-socket", sock]
    if token:
        args += ["--token", token]
    svc = ServiceProcess(workdir, args + (extra or []), port, token, sock)
    return svc.start()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service per test module (namespaces keep tests apart); stopped with SIGTERM."""
    svc = start_service(tmp_path_factory.mktemp("service"))
    yield svc
    assert svc.stop() == 0, svc.output()


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def make(name: str = "svc", **kwargs) -> ServiceProcess:
        svc = start_service(tmp_path / name, **kwargs)
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop(signal.SIGKILL)


@pytest.fixture
def client(service: ServiceProcess) -> Iterator[CacheClient]:
    with service.client() as c:
        yield c


def make_namespace(**overrides) -> Namespace:
    """A namespace no other test uses (distinct model name)."""
    fields = {"model": f"test-model-{os.getpid()}-{next(_names)}", "dtype": "bfloat16"}
    fields |= {"layout": "NHD", "block_tokens": BLOCK_TOKENS}
    return Namespace(**(fields | overrides))


def make_keys(ns: Namespace, n: int, seed: int = 0) -> list[bytes]:
    """Prefix keys of n full blocks of pseudo-random tokens."""
    tokens = np.random.default_rng(seed).integers(0, 50_000, n * ns.block_tokens)
    return prefix_keys(tokens, ns.seed, ns.block_tokens)


def make_blocks(n: int, block_bytes: int = BLOCK_BYTES, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed + 1_000_003)
    return [rng.integers(0, 256, block_bytes, dtype=np.uint8).tobytes() for _ in range(n)]
