"""Hosts for multi-host tests on one machine: each a Linux network namespace with its own
loopback and one veth link to the root namespace, where shared servers (a Redis Cluster) bind
to the link's root-side address. Traffic stays on the private 10.231.0.0/16 addresses made
here; a process started in a host sees no other host's loopback.

Needs root and ``ip netns``; without them ``make_hosts`` skips the test with the reason, or
with ``fallback`` gives loopback "hosts" (separate processes, arenas and disks, one network).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

_NET = "10.231"


@dataclass(frozen=True)
class NetHost:
    name: str  # the namespace
    addr: str  # this host's address on its link
    gateway: str  # the root namespace's address on the same link

    @property
    def wrap(self) -> list[str]:
        """Prefix for a command that must run on this host."""
        return ["ip", "netns", "exec", self.name] if self.name else []


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    probe = f"cs-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"ip netns add failed: {e.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@contextmanager
def make_hosts(count: int, fallback: bool = False) -> Iterator[list[NetHost]]:
    """``count`` hosts; host i is 10.231.<i+1>.2 behind the root-side 10.231.<i+1>.1. Hosts
    reach every root-side address (the default route points at their gateway), so a server
    bound to ``hosts[0].gateway`` serves them all."""
    if (reason := _why_not()) is not None:
        if not fallback:
            pytest.skip(reason)
        print(f"hosts share loopback: {reason}")
        yield [NetHost("", "127.0.0.1", "127.0.0.1") for _ in range(count)]
        return
    tag = os.getpid() % 10000
    hosts: list[NetHost] = []
    try:
        for i in range(count):
            host = NetHost(f"cs{tag}h{i}", f"{_NET}.{i + 1}.2", f"{_NET}.{i + 1}.1")
            outer, inner = f"cs{tag}v{i}", f"cs{tag}p{i}"
            _ip("netns", "add", host.name)
            hosts.append(host)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", host.name)
            _ip("addr", "add", f"{host.gateway}/24", "dev", outer)
            _ip("link", "set", outer, "up")
            ns = ["-n", host.name]
            _ip(*ns, "addr", "add", f"{host.addr}/24", "dev", inner)
            _ip(*ns, "link", "set", inner, "up")
            _ip(*ns, "link", "set", "lo", "up")
            _ip(*ns, "route", "add", "default", "via", host.gateway)
        yield hosts
    finally:
        for i, host in enumerate(hosts):
            subprocess.run(["ip", "link", "del", f"cs{tag}v{i}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
