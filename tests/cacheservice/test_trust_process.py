"""Start-up and process safety, and who may talk to the service: real ``cacheservice serve``
processes, real /dev/shm-style files, a real other user (``nobody``) on the same host."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from cacheservice.arena import ArenaView
from cacheservice.client import CacheClient
from cacheservice.errors import Unauthorized
from tests.factories import BLOCK_BYTES, make_namespace, make_payloads, make_prefix_keys
from tests.processes import free_port, run_serve, service_args, start_service


def test_second_serve_on_a_busy_port_leaves_the_live_arena_alone(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "svc")
    ino = os.stat(svc.arena_path).st_ino
    done = run_serve(service_args(tmp_path / "svc", svc.port))  # same port, same arena
    assert done.returncode == 2, done.stderr
    assert f"{svc.port}" in done.stderr or str(svc.proc.pid) in done.stderr
    other = run_serve(service_args(tmp_path / "svc", free_port()))  # same arena, free port
    assert other.returncode == 2 and str(svc.proc.pid) in other.stderr, other.stderr
    assert os.stat(svc.arena_path).st_ino == ino
    with svc.client() as c:  # new engines can still map the live arena
        info = c.register(make_namespace(), BLOCK_BYTES)
        with ArenaView.open(info.arena["path"]) as view:
            assert view.num_slots == info.arena["num_slots"]
    svc.stop()
    assert not os.path.lexists(svc.arena_path) and not os.path.lexists(svc.arena_path + ".lock")
    svc.start()  # the path is free again once its owner is gone
    svc.stop()


def test_failed_starts_leave_no_arena(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    args = service_args(tmp_path, free_port())
    args[args.index("--disk-dir") + 1] = str(blocker / "disk")
    done = run_serve(args)
    assert done.returncode != 0 and not os.path.lexists(tmp_path / "arena"), done.stderr
    huge = service_args(tmp_path, free_port()) + ["--arena-bytes", "1TiB"]
    done = run_serve(huge)
    assert done.returncode == 2 and "--arena-bytes" in done.stderr, done.stderr
    assert not os.path.lexists(tmp_path / "arena")
    assert not os.path.lexists(tmp_path / "arena.lock"), "the owner lock outlived the start"


def test_dangling_symlink_at_the_arena_path_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "svc").mkdir()
    os.symlink(tmp_path / "gone", tmp_path / "svc" / "arena")
    svc = start_service(tmp_path / "svc")
    assert not os.path.islink(svc.arena_path)
    svc.stop()


def test_unknown_environment_variables_warn_instead_of_refusing(tmp_path: Path) -> None:
    env = {"CACHESERVICE_URL": "http://127.0.0.1:1", "CACHESERVICE_DISK_BYTE": "1GiB"}
    svc = start_service(tmp_path / "svc", env=env)
    assert "CACHESERVICE_DISK_BYTE" in svc.output() and "DISK_BYTES" in svc.output()
    svc.stop()


def test_rediss_is_refused_not_downgraded(tmp_path: Path) -> None:
    args = service_args(tmp_path, free_port()) + ["--redis-url", "rediss://127.0.0.1:6380/0"]
    done = run_serve(args)
    assert done.returncode == 2 and "TLS" in done.stderr


def test_files_are_private(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "svc")
    with svc.client() as c:
        ns = make_namespace()
        info = c.register(ns, BLOCK_BYTES)
        assert c.put_blocks(info.ns, make_prefix_keys(ns, 2), b"".join(make_payloads(2))) == 2
    svc.stop()  # drains write-down
    disk = tmp_path / "svc" / "disk"
    files = [p for d in disk.iterdir() for p in d.iterdir()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    dirs = [disk, *disk.iterdir()]
    assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in dirs)


OTHER_USER = textwrap.dedent(
    """
    import http.client, json, sys
    port = int(sys.argv[1])
    out = {}
    for method, path in (("GET", "/v1/stats"), ("POST", "/v1/blocks/get"),
                         ("POST", "/v1/blocks/put"), ("GET", "/health")):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request(method, path, body=b"\\x80" if method == "POST" else None,
                  headers={"Content-Type": "application/msgpack"})
        out[path] = c.getresponse().status
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as user nobody")
def test_default_start_shuts_out_other_local_users(tmp_path: Path) -> None:
    home = tmp_path / "home"
    svc = start_service(tmp_path / "svc", env={"HOME": str(home)})  # default: no --token
    token_file = home / ".config" / "cacheservice" / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    token = token_file.read_text().strip()
    with CacheClient(svc.url, token=token) as c:  # the same user reads the file: works
        assert c.stats()["namespaces"] == 0
    with CacheClient(svc.url, token="wrong") as c, pytest.raises(Unauthorized):
        c.stats()
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
         "-c", OTHER_USER, str(svc.port)],
        capture_output=True, text=True, timeout=30, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        '{"/v1/stats": 401, "/v1/blocks/get": 401, "/v1/blocks/put": 401, "/health": 200}'
    )
    svc.stop(signal.SIGTERM)


def test_auth_none_opens_the_service_deliberately(tmp_path: Path) -> None:
    home = tmp_path / "home"
    svc = start_service(tmp_path / "svc", env={"HOME": str(home)}, extra=["--auth", "none"])
    assert not (home / ".config" / "cacheservice" / "token").exists()
    assert "every local user" in svc.output()
    with CacheClient(svc.url, token="anything") as c:
        assert c.stats()["namespaces"] == 0
    svc.stop()


def test_token_flag_warns_that_ps_shows_it(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "svc", token="s3cret")
    assert "visible to every local user" in svc.output()
    svc.stop()
