"""Fixtures every test package shares: a real cacheservice subprocess and a client of it."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cacheservice.client import CacheClient
from tests.processes import ServiceProcess, start_service


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
