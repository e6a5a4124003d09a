"""Fixtures every test package shares: a real cacheservice subprocess and a client of it."""

from __future__ import annotations

import os
import signal
import subprocess
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


@pytest.fixture
def make_mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``make_mount(size="64m")``: a real tmpfs mounted under tmp_path (root only; skipped
    with the reason otherwise), unmounted after the test."""
    mounted: list[Path] = []

    def make(size: str = "64m", name: str = "mnt") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs as root)")
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs a redis-server carries the marker, also when it only asks for one
    through a fixture (``-m "not redis"`` then really runs no Redis)."""
    for item in items:
        if {"redis_proc", "redis_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)
