"""Config layering and validation, and the ``cacheservice`` command line as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cacheservice.config import ConfigError, ServiceConfig, load_config, parse_size
from tests.processes import REPO, ServiceProcess, free_port


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO)) | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "cacheservice", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_defaults_are_cpu_plus_disk() -> None:
    cfg = load_config(env={})
    assert cfg.port == 8642 and cfg.host == "127.0.0.1"
    assert cfg.arena_path == "/dev/shm/cacheservice-8642"
    assert cfg.arena_bytes == 1 << 30
    assert cfg.disk_dir == os.path.expanduser("~/.cache/cacheservice/disk")
    assert cfg.disk_bytes == 16 << 30
    assert cfg.redis_url is None and cfg.token is None
    assert cfg.url == "http://127.0.0.1:8642"


def test_layers_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "cs.toml"
    path.write_text('port = 9000\narena_bytes = "64MiB"\nlease_ms = 1000\nlog_level = "debug"\n')
    env = {"CACHESERVICE_PORT": "9100", "CACHESERVICE_LEASE_MS": "2000", "HOME_IGNORED": "x"}
    cfg = load_config(str(path), env=env, overrides={"lease_ms": "3000", "port": None})
    assert cfg.arena_bytes == 64 << 20  # file only
    assert cfg.port == 9100  # env beats file; a None flag is unset
    assert cfg.lease_ms == 3000  # flag beats env
    assert cfg.log_level == "debug"
    assert cfg.arena_path == "/dev/shm/cacheservice-9100"


def test_config_table_and_env_config_path(tmp_path: Path) -> None:
    path = tmp_path / "cs.toml"
    path.write_text('[cacheservice]\nredis_url = "redis://10.0.0.1:6379/0"\nredis_bytes = "1g"\n')
    cfg = load_config(env={"CACHESERVICE_CONFIG": str(path)})
    assert cfg.redis_url == "redis://10.0.0.1:6379/0" and cfg.redis_bytes == 1 << 30


def test_empty_disk_dir_means_no_disk_tier() -> None:
    assert load_config(env={"CACHESERVICE_DISK_DIR": ""}).disk_dir is None


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"slot_bytes": 5000}, "slot_bytes must be a positive multiple of 4096"),
        ({"arena_bytes": "4k", "slot_bytes": 8192}, "arena_bytes=4096 cannot hold"),
        ({"port": 70000}, "port must be in"),
        ({"port": 0}, "no unix_socket"),
        ({"redis_url": "localhost:6379"}, "redis_url must look like"),
        ({"log_level": "loud"}, "log_level must be one of"),
        ({"max_keys": "many"}, "max_keys must be an integer"),
        ({"disk_bytes": "12 parsecs"}, "disk_bytes must be a byte size"),
        ({"colour": "blue"}, "unknown setting 'colour'"),
        ({"redis_mode": "ring"}, "redis_mode must be one of"),
        ({"redis_url": "redis://h:26379", "redis_mode": "sentinel"}, "name the master"),
        ({"redis_url": "redis://h/mm", "redis_mode": "sentinel"}, "must be host:port"),
    ],
)
def test_bad_settings_name_the_fix(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(env={}, overrides=overrides)


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(path), env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.toml"), env={})


def test_parse_size_units() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64k") == 64 << 10
    assert parse_size("512MiB") == 512 << 20
    assert parse_size(" 2 GB ") == 2 << 30
    with pytest.raises(ConfigError):
        parse_size(True)


def test_unix_only_config_has_unix_url(tmp_path: Path) -> None:
    cfg = ServiceConfig(port=0, unix_socket=str(tmp_path / "s.sock"))
    assert cfg.url == f"unix://{tmp_path / 's.sock'}"


def test_cli_rejects_bad_slot_bytes_with_exit_2() -> None:
    r = run_cli("serve", "--slot-bytes", "5000", "--port", str(free_port()))
    assert r.returncode == 2
    assert "slot_bytes must be a positive multiple of 4096" in r.stderr


def test_cli_stats_prints_json(service: ServiceProcess) -> None:
    r = run_cli("stats", "--url", service.http_url)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert "blocks" in stats and "host" in stats["capacity"]


def test_cli_stats_against_nothing_fails_fast() -> None:
    r = run_cli("stats", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert r.returncode == 1
    assert "cannot reach cacheservice" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(tmp_path: Path, sig: int) -> None:
    port = free_port()
    args = ["--port", str(port), "--arena-path", str(tmp_path / "arena"), "--arena-bytes", "64k"]
    args += ["--slot-bytes", "4096", "--disk-dir", str(tmp_path / "disk")]
    svc = ServiceProcess(tmp_path, args, port).start()
    assert svc.stop(sig) == 0, svc.output()
    assert "cacheservice stopped" in svc.output()


def test_rag_example_runs_against_the_service(service: ServiceProcess) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "examples" / "rag_client.py"), "--url", service.url],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert (
        sum(": hit," in line for line in lines) == 2
        and sum(": miss" in line for line in lines) == 1
    )
    assert json.loads(lines[-1])["stores"] > 0
