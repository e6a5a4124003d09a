"""Fixtures for the vLLM connector tests: a tiny random Llama built on disk and cacheservice
subprocesses sized for its blocks (helpers: engines.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.connectors.vllm.engines import start_llm_service
from tests.connectors.vllm.tiny_model import TinyLlama, make_tiny_llama
from tests.processes import ServiceProcess


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyLlama:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServiceProcess]:
    svc = start_llm_service(tmp_path / "service")
    yield svc
    svc.stop()


@pytest.fixture
def make_llm_service(tmp_path: Path) -> Iterator[Callable[[str], ServiceProcess]]:
    started: list[ServiceProcess] = []

    def make(name: str) -> ServiceProcess:
        started.append(start_llm_service(tmp_path / name))
        return started[-1]

    yield make
    for svc in started:
        svc.stop()
