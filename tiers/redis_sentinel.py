"""Redis tier behind Redis Sentinel: one master with replicas, its address learnt from the
sentinels and learnt again when it fails over.

``url``: ``redis://[user:password@]sentinel:port[,sentinel:port...]/<master-name>[?db=N]``; the
user and password are the data nodes' (ACL), ``?sentinel_password=...`` the sentinels' own.

Same value format, accounting, zero-copy bulk path and failure contract as the single-server
tier (redis.py): it runs against whichever server the sentinels name as master. A bulk call
that fails (the master died, or was demoted and answers READONLY) asks the sentinels again and,
when they name another master, runs once more there; until a replica is promoted it is a miss,
never a hang (the tier's ``retry_after`` applies). The small commands go through redis-py's Sentinel
client, which re-resolves the master on its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qs, unquote

from redis.asyncio.sentinel import Sentinel

from tiers.redis import RedisTier
from tiers.resp import RespConnection, RespError

T = TypeVar("T")


class SentinelURLError(ValueError):
    """The URL does not name the sentinels and the master as the tier expects."""


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, str]]:
    """(sentinel addresses, master name, options: username, password, db, sentinel_password)."""
    if not url.startswith("redis://"):
        raise SentinelURLError(f"a Sentinel URL starts with redis://, got {url!r}")
    rest, _, query = url.removeprefix("redis://").partition("?")
    hosts, _, name = rest.partition("/")
    opts: dict[str, str] = {k: v[0] for k, v in parse_qs(query).items()}
    if "@" in hosts:
        cred, _, hosts = hosts.rpartition("@")
        user, _, password = cred.partition(":")
        opts["username"], opts["password"] = unquote(user), unquote(password)
    sentinels = []
    for hp in hosts.split(","):
        host, _, port = hp.rpartition(":")
        if not host or not port.isdigit():
            raise SentinelURLError(f"sentinel address {hp!r} must be host:port in {url!r}")
        sentinels.append((host, int(port)))
    if not name:
        raise SentinelURLError(f"name the master after the sentinels: .../mymaster, in {url!r}")
    return sentinels, unquote(name), opts


class RedisSentinelTier(RedisTier):
    def _make_client(self, url: str, timeout: float, connect_timeout: float):
        sentinels, self._master, opts = parse_sentinel_url(url)
        self._db = int(opts.get("db", 0))
        user, password = opts.get("username") or "", opts.get("password")
        self._auth = f"{user}:{password}@" if password else ""
        self._master_url: str | None = None
        sentinel_auth = {k.removeprefix("sentinel_"): v for k, v in opts.items()
                         if k == "sentinel_password"}  # fmt: skip
        self._sentinel = Sentinel(
            sentinels,
            sentinel_kwargs={"socket_timeout": connect_timeout, **sentinel_auth},
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            username=user or None,
            password=password,
            db=self._db,
            protocol=2,
        )
        return self._sentinel.master_for(self._master)

    async def _probe(self) -> None:
        await self._discover()
        await self._client.ping()

    async def _discover(self) -> str:
        host, port = await self._sentinel.discover_master(self._master)
        self._master_url = f"redis://{self._auth}{host}:{port}/{self._db}"
        return self._master_url

    async def _on_connection(
        self, op: Callable[[RespConnection], Awaitable[T]], url: str | None = None
    ) -> T:
        master = self._master_url or await self._discover()
        try:
            return await super()._on_connection(op, master)
        except (OSError, RespError):
            self._master_url = None  # dead or demoted (READONLY): ask the sentinels again
            for conn in self._idle.pop(master, []):
                conn.close()
            if await self._discover() == master:
                raise  # not failed over (yet): this call is a miss
        return await super()._on_connection(op, self._master_url)  # promoted: once more there

    async def close(self) -> None:
        await super().close()
        for s in self._sentinel.sentinels:
            await s.aclose()
