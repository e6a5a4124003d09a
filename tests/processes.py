"""Real processes for tests: a throwaway redis-server and a ``python -m cacheservice serve``
subprocess, each on a free loopback port with its files under a test's tmp dir. Fixtures in
the conftests wrap these; engine tests import ``start_service`` to run a service beside them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cacheservice.client import CacheClient
from index.hashing import Namespace

REPO = Path(__file__).resolve().parents[1]
SLOT_BYTES = 4096  # 64-byte header + up to 4032 payload bytes


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
    env: dict[str, str] = field(default_factory=dict)  # extra variables for the service
    wrap: list[str] = field(default_factory=list)  # command prefix: ``ip netns exec <host>``
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

    def corrupt_arena_copy(
        self, ns: Namespace, block_bytes: int, keys: list[bytes], index: int = 0
    ) -> None:
        """Flip 8 bytes of the arena copy of ``keys[index]`` (``keys``: its chain from the
        first block, which acquire pins from); lower tiers keep their copies."""
        from cacheservice.arena import ArenaView

        with self.client() as client:
            acq = client.acquire(ns.id, keys[: index + 1])
            info = client.register(ns, block_bytes)
            with ArenaView.open(info.arena["path"]) as arena:
                view = arena.payload(acq.slots[index], acq.lengths[index])
                view[10:18] = bytes(8) if bytes(view[10:18]) != bytes(8) else b"\xff" * 8
                del view
            client.release(acq.lease)

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrap, sys.executable, "-m", "cacheservice", "serve", *self.args],
                cwd=REPO,
                env=service_env(self.env),
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


def service_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a test's service runs in: ours, less every CACHESERVICE_* variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHESERVICE_")}
    return env | {"PYTHONPATH": str(REPO)} | (extra or {})


def service_args(workdir: Path, port: int) -> list[str]:
    """Tiny tiers under ``workdir``: a 1 MiB arena of 4 KiB slots, a 16 MiB disk tier."""
    args = ["--port", str(port), "--arena-path", str(workdir / "arena")]
    args += ["--arena-bytes", "1MiB", "--slot-bytes", str(SLOT_BYTES)]
    return args + ["--disk-dir", str(workdir / "disk"), "--disk-bytes", "16MiB"]


def run_serve(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess:
    """Run ``cacheservice serve`` expected to refuse to start; returns its exit and output."""
    return subprocess.run(
        [sys.executable, "-m", "cacheservice", "serve", *args],
        cwd=REPO,
        env=service_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_service(
    workdir: Path,
    *,
    token: str | None = None,
    unix_socket: bool = False,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    wrap: list[str] | None = None,
) -> ServiceProcess:
    """Start ``python -m cacheservice serve`` with tiny tiers under ``workdir`` (on another
    network host with ``wrap``: reach it through ``unix_socket`` then)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = service_args(workdir, port) + ["--log-level", "info"]
    sock = None
    if unix_socket:
        sock = str(workdir / "cs.sock")
        args += ["--unix-socket", sock]
    if token:
        args += ["--token", token]
    svc = ServiceProcess(workdir, args + (extra or []), port, token, sock, env or {}, wrap or [])
    return svc.start()


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisProcess:
    url: str
    port: int
    proc: subprocess.Popen

    def kill(self) -> None:
        _kill(self.proc)


def start_redis(workdir: Path) -> RedisProcess:
    """Start a throwaway redis-server (no persistence) and wait until it accepts connections."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", str(workdir), "--protected-mode", "no"]
    args += ["--enable-debug-command", "local"]  # DEBUG SLEEP: a stalled server, on demand
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return RedisProcess(f"redis://127.0.0.1:{port}/0", port, proc)
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"redis-server did not start on port {port}")


@dataclass
class RedisClusterProcess:
    """A real Redis Cluster on loopback: ``masters`` masters with ``replicas`` replicas each."""

    nodes: dict[int, subprocess.Popen]  # port -> redis-server
    tls: Path | None = None  # the certificates directory of a TLS cluster (make_tls_certs)
    host: str = "127.0.0.1"  # the address every node binds and announces

    @property
    def url(self) -> str:
        if self.tls is None:
            return f"redis://{self.host}:{min(self.nodes)}"
        files = f"ssl_ca_certs={self.tls}/ca.crt&ssl_certfile={self.tls}/client.crt"
        return f"rediss://{self.host}:{min(self.nodes)}?{files}&ssl_keyfile={self.tls}/client.key"

    def cli(self, port: int, *args: str) -> str:
        return _redis_cli(self, port, *args)

    def masters(self) -> list[int]:
        return [p for p, role in self.roles().items() if role == "master"]

    def roles(self) -> dict[int, str]:
        out = {}
        for port, proc in self.nodes.items():
            if proc.poll() is None:
                info = _redis_cli(self, port, "ROLE").split()
                out[port] = info[0] if info else "unknown"
        return out

    def replicas_synced(self, expected: int) -> bool:
        ports = [p for p, role in self.roles().items() if role == "slave"]
        up = [
            p
            for p in ports
            if "master_link_status:up" in _redis_cli(self, p, "INFO", "replication")
        ]
        return len(up) >= expected

    def kill(self, port: int) -> None:
        _kill(self.nodes[port])

    def wait_ok(self, timeout: float = 30.0, masters: int | None = None) -> None:
        """Until every live node says cluster_state:ok (and, given ``masters``, that many live
        masters serve the slots: a killed master's replica was promoted)."""

        def ok() -> bool:
            live = [p for p, proc in self.nodes.items() if proc.poll() is None]
            if not all("cluster_state:ok" in _redis_cli(self, p, "CLUSTER", "INFO") for p in live):
                return False
            return masters is None or len(self.masters()) == masters

        wait_until(ok, timeout, "redis cluster did not become ok")

    def stop(self) -> None:
        for port in self.nodes:
            self.kill(port)


def _tls_cli_args(tls: Path | None) -> list[str]:
    if tls is None:
        return []
    return ["--tls", "--cacert", f"{tls}/ca.crt", "--cert", f"{tls}/client.crt",
            "--key", f"{tls}/client.key"]  # fmt: skip


def _redis_cli(cluster: RedisClusterProcess | None, port: int, *args: str) -> str:
    tls = _tls_cli_args(cluster.tls if cluster is not None else None)
    host = cluster.host if cluster is not None else "127.0.0.1"
    done = subprocess.run(
        [REDIS_CLI, *tls, "-h", host, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return done.stdout


def make_tls_certs(where: Path) -> Path:
    """A throwaway CA and a server + client certificate for 127.0.0.1 (openssl)."""
    where.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    (where / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
            "-extfile", "san.cnf")  # fmt: skip
    return where


REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too and below 65536."""
    import random

    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def start_redis_cluster(
    workdir: Path,
    masters: int = 3,
    replicas: int = 1,
    tls: Path | None = None,
    host: str = "127.0.0.1",
) -> RedisClusterProcess:
    """Start and create a cluster on ``host`` (loopback by default; a netns link's root-side
    address to serve other hosts); with ``tls`` (make_tls_certs) it speaks only TLS, on
    client, bus and replication links."""
    if not os.path.exists(REDIS_SERVER) or not os.path.exists(REDIS_CLI):
        pytest.skip("redis-server/redis-cli are not installed (apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    nodes: dict[int, subprocess.Popen] = {}
    for _ in range(masters * (1 + replicas)):
        port = _free_cluster_port()
        if tls is None:
            args = [REDIS_SERVER, "--port", str(port), "--bind", host, "--save", ""]
        else:
            args = [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", host]
            args += ["--save", "", "--tls-cluster", "yes", "--tls-replication", "yes"]
            args += ["--tls-cert-file", f"{tls}/server.crt", "--tls-key-file", f"{tls}/server.key"]
            args += ["--tls-ca-cert-file", f"{tls}/ca.crt"]
        args += ["--appendonly", "no", "--dir", str(workdir), "--protected-mode", "no"]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
        args += ["--cluster-node-timeout", "1000", "--enable-debug-command", "local"]
        # replicas sync at once: one that never synced would not take over a dead master
        args += ["--repl-diskless-sync-delay", "0"]
        nodes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cluster = RedisClusterProcess(nodes, tls, host)
    try:
        wait_until(lambda: all("PONG" in _redis_cli(cluster, p, "PING") for p in nodes), 10,
                    "redis cluster nodes did not start", interval=0.05)  # fmt: skip
        create = [REDIS_CLI, *_tls_cli_args(tls), "--cluster", "create"]
        create += [f"{host}:{p}" for p in nodes]
        create += ["--cluster-replicas", str(replicas), "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        cluster.wait_ok()
        # replicas attach and sync a moment after that
        wait_until(lambda: cluster.replicas_synced(masters * replicas), 20,
                    "redis cluster replicas did not sync")  # fmt: skip
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class RedisSentinelProcess:
    """A master, its replica and three sentinels watching them (quorum 2), on loopback."""

    servers: dict[int, subprocess.Popen]  # data port -> redis-server (master or replica)
    sentinels: dict[int, subprocess.Popen]
    name: str = "cs-master"
    password: str | None = None

    def url(self, user: str = "", password: str | None = None) -> str:
        cred = f"{user}:{password}@" if password else ""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
        return f"redis://{cred}{hosts}/{self.name}"

    def master(self) -> int:
        """The data port the sentinels name as master now."""
        reply = _redis_cli(None, next(iter(self.sentinels)), "SENTINEL", "get-master-addr-by-name",
                           self.name).split()  # fmt: skip
        return int(reply[1])

    def cli(self, port: int, *args: str) -> str:
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        return _redis_cli(None, port, *auth, *args)

    def kill(self, port: int) -> None:
        _kill(self.servers[port])

    def wait_promoted(self, old: int, timeout: float = 30.0) -> int:
        """Until the sentinels name a live master other than ``old``; its port."""

        found: list[int] = []

        def promoted() -> bool:
            port = self.master()
            found[:] = [port]
            return port != old and "role:master" in self.cli(port, "INFO", "replication")

        wait_until(promoted, timeout, "the sentinels did not promote a replica")
        return found[0]

    def stop(self) -> None:
        for proc in (*self.servers.values(), *self.sentinels.values()):
            _kill(proc)


def start_redis_sentinel(workdir: Path, password: str | None = None) -> RedisSentinelProcess:
    """Start a master, one replica and three sentinels (down-after 1 s), wait until the replica
    synced and every sentinel knows the replica and its peers. ``password``: ``requirepass``
    (and ``masterauth``) on the data nodes."""
    if not os.path.exists(REDIS_SERVER) or not os.path.exists(REDIS_CLI):
        pytest.skip("redis-server/redis-cli are not installed (apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    sentinel = RedisSentinelProcess({}, {}, password=password)
    try:
        master = None
        for _ in range(2):
            port = free_port()
            args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            args += ["--appendonly", "no", "--dir", str(workdir), "--protected-mode", "no"]
            args += ["--repl-diskless-sync-delay", "0"]
            if password:
                args += ["--requirepass", password, "--masterauth", password]
            if master is not None:
                args += ["--replicaof", "127.0.0.1", str(master)]
            master = master or port
            sentinel.servers[port] = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        for _ in range(3):
            port = free_port()
            conf = workdir / f"sentinel-{port}.conf"  # a sentinel rewrites its own config
            lines = [f"port {port}", "bind 127.0.0.1", "protected-mode no", f"dir {workdir}",
                     f"sentinel monitor {sentinel.name} 127.0.0.1 {master} 2",
                     f"sentinel down-after-milliseconds {sentinel.name} 1000",
                     f"sentinel failover-timeout {sentinel.name} 5000"]  # fmt: skip
            if password:
                lines.append(f"sentinel auth-pass {sentinel.name} {password}")
            conf.write_text("\n".join(lines) + "\n")
            sentinel.sentinels[port] = subprocess.Popen(
                [REDIS_SERVER, str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        replica = next(p for p in sentinel.servers if p != master)

        def ready() -> bool:
            if "master_link_status:up" not in sentinel.cli(replica, "INFO", "replication"):
                return False
            known = [_redis_cli(None, p, "SENTINEL", "master", sentinel.name)
                     for p in sentinel.sentinels]  # fmt: skip
            return all(_field(k, "num-slaves") == "1" and _field(k, "num-other-sentinels") == "2"
                       for k in known)  # fmt: skip

        wait_until(ready, 30, "redis sentinels did not learn the replica and each other")
        return sentinel
    except BaseException:
        sentinel.stop()
        raise


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def wait_until(ready, timeout: float, failure: str, interval: float = 0.1) -> float:
    """Poll ``ready()`` until it is true; returns the seconds it took. RuntimeError(``failure``)
    after ``timeout`` seconds."""
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout:
            raise RuntimeError(failure)
        time.sleep(interval)
    return time.monotonic() - start


def _field(reply: str, name: str) -> str | None:
    """The value after ``name`` in redis-cli's one-item-per-line answer to SENTINEL MASTER."""
    lines = reply.split("\n")
    return lines[lines.index(name) + 1] if name in lines else None
