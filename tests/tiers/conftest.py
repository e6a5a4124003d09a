"""Real parts for tier tests: a redis-server on a free port (blocks: tests/factories.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import RedisProcess, start_redis  # noqa: F401  (re-exported)


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def redis_server(redis_proc: RedisProcess) -> str:
    """URL of a fresh redis-server, killed after the test."""
    return redis_proc.url
