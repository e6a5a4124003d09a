"""Service settings: embedded defaults < TOML file < CACHESERVICE_* env vars < CLI flags.

Byte sizes accept plain integers or strings with a unit ("1GiB", "512MiB", "64k"), so the same
value reads the same in a TOML file, an env var and a flag.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib  # Python 3.11+ (pyproject's requires-python)
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from tiers.base import HEADER_BYTES

log = logging.getLogger("cacheservice.config")
ENV_PREFIX = "CACHESERVICE_"
# CACHESERVICE_* variables that clients (not the service) read: never a typo.
CLIENT_ENV = frozenset({"url", "config"})
AUTH_MODES = ("token", "none")
REDIS_MODES = ("single", "cluster", "sentinel")
DEFAULT_PORT = 8642
PAGE = 4096
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LOG_LEVELS = ("debug", "info", "warning", "error")

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kb": KiB,
    "kib": KiB,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


class ConfigError(ValueError):
    """A setting is missing, mistyped or out of range; the message names the setting to fix."""


@dataclass(frozen=True)
class ServiceConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 = no TCP listener (unix socket only)
    unix_socket: str | None = None
    # Same-host frames socket for engines' data-plane calls; "auto" = <arena_path>.sock
    frames_socket: str | None = "auto"
    token: str | None = None
    token_file: str | None = None  # None = $CACHESERVICE_TOKEN_FILE or ~/.config/cacheservice/token
    auth: str = "token"  # "none" opens the service to every local user: deliberate only
    allowed_hosts: str = ""  # Host names besides IP literals and localhost ("*" = any)
    arena_path: str | None = None  # None = /dev/shm/cacheservice-<port>
    arena_bytes: int = GiB
    slot_bytes: int = 2 * MiB + PAGE  # a 2 MiB block (e.g. 8B model, 16 tokens, bf16) fits
    disk_dir: str | None = "~/.cache/cacheservice/disk"  # None or "" = no disk tier
    disk_bytes: int = 16 * GiB
    redis_url: str | None = None  # None = no Redis tier
    # "single" (one server), "cluster" (native Redis Cluster) or "sentinel" (a master found
    # through Redis Sentinel: redis_url names the sentinels and the master)
    redis_mode: str = "single"
    redis_bytes: int = 4 * GiB
    max_body_bytes: int = 64 * MiB
    max_keys: int = 65536
    lease_ms: int = 30000
    remote_lookup_ms: int = 50  # budget for asking a shared tier about unknown keys in a lookup
    # The service's tier changes as vLLM KV events (PUB + ROUTER replay); None = not published
    events_endpoint: str | None = None
    events_replay_endpoint: str | None = None
    events_topic: str = ""
    max_engines: int = 64  # engines whose KV events the service may follow
    prefill_tokens_per_s: int = 20000  # routing cost of a computed token, unless a call says
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.arena_path is None:
            name = f"cacheservice-{self.port}" if self.port else "cacheservice-unix"
            object.__setattr__(self, "arena_path", os.path.join("/dev/shm", name))
        if self.disk_dir:
            object.__setattr__(self, "disk_dir", os.path.expanduser(self.disk_dir))
        else:
            object.__setattr__(self, "disk_dir", None)
        if not self.redis_url:
            object.__setattr__(self, "redis_url", None)
        if not self.token:
            object.__setattr__(self, "token", None)
        if not self.unix_socket:
            object.__setattr__(self, "unix_socket", None)
        if self.frames_socket == "auto":
            object.__setattr__(self, "frames_socket", f"{self.arena_path}.sock")
        elif not self.frames_socket or self.frames_socket == "none":
            object.__setattr__(self, "frames_socket", None)
        for name in ("events_endpoint", "events_replay_endpoint"):
            if not getattr(self, name):
                object.__setattr__(self, name, None)
        self._validate()

    def _validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.port == 0 and self.unix_socket is None:
            raise ConfigError("port is 0 (no TCP) and no unix_socket is set: set one of them")
        if self.slot_bytes % PAGE or self.slot_bytes <= HEADER_BYTES:
            raise ConfigError(
                f"slot_bytes must be a positive multiple of {PAGE} (64-byte header + max block "
                f"payload, rounded up), got {self.slot_bytes}; "
                f"try {max(PAGE, -(-self.slot_bytes // PAGE) * PAGE)}"
            )
        if self.arena_bytes < self.slot_bytes:
            raise ConfigError(
                f"arena_bytes={self.arena_bytes} cannot hold one slot of slot_bytes="
                f"{self.slot_bytes}: raise arena_bytes or lower slot_bytes"
            )
        if self.disk_dir is not None and self.disk_bytes <= 0:
            raise ConfigError("disk_bytes must be positive (or unset disk_dir to run without disk)")
        if self.auth not in AUTH_MODES:
            raise ConfigError(f"auth must be one of {AUTH_MODES}, got {self.auth!r}")
        if self.remote_lookup_ms <= 0:
            raise ConfigError(f"remote_lookup_ms must be positive, got {self.remote_lookup_ms}")
        if self.redis_mode not in REDIS_MODES:
            raise ConfigError(f"redis_mode must be one of {REDIS_MODES}, got {self.redis_mode!r}")
        if self.redis_url is not None:
            if self.redis_url.startswith("rediss://") and self.redis_mode != "cluster":
                # The single-server bulk path speaks plain RESP on its own sockets: accepting
                # rediss:// would send KV in clear text while the URL promises TLS.
                raise ConfigError(
                    "redis_url rediss:// (TLS) needs --redis-mode cluster (its client speaks "
                    "TLS); the single-server tier would send KV unencrypted"
                )
            if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigError(
                    f"redis_url must look like redis://host:port/db, got {self.redis_url!r}"
                )
            if self.redis_mode == "sentinel":
                from tiers.redis_sentinel import SentinelURLError, parse_sentinel_url

                try:
                    parse_sentinel_url(self.redis_url)
                except SentinelURLError as e:
                    raise ConfigError(str(e)) from None
            if self.redis_bytes <= 0:
                raise ConfigError("redis_bytes must be positive")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_keys <= 0:
            raise ConfigError(f"max_keys must be positive, got {self.max_keys}")
        if self.lease_ms <= 0:
            raise ConfigError(f"lease_ms must be positive, got {self.lease_ms}")
        for name in ("events_endpoint", "events_replay_endpoint"):
            value = getattr(self, name)
            if value is not None and not value.startswith(("tcp://", "ipc://")):
                raise ConfigError(f"{name} must be tcp://host:port or ipc://path, got {value!r}")
        if self.events_replay_endpoint is not None and self.events_endpoint is None:
            raise ConfigError("events_replay_endpoint needs events_endpoint (the PUB socket)")
        if self.max_engines <= 0 or self.prefill_tokens_per_s <= 0:
            raise ConfigError("max_engines and prefill_tokens_per_s must be positive")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")

    @property
    def url(self) -> str:
        """Where a client on this host should connect (unix socket preferred: no TCP stack)."""
        if self.unix_socket:
            return f"unix://{self.unix_socket}"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"


_FIELDS = {f.name: f for f in fields(ServiceConfig)}
_INT_FIELDS = {"port", "arena_bytes", "slot_bytes", "disk_bytes", "redis_bytes"}
_INT_FIELDS |= {"max_body_bytes", "max_keys", "lease_ms", "remote_lookup_ms"}
_INT_FIELDS |= {"max_engines", "prefill_tokens_per_s"}


def parse_size(value: Any, name: str = "size") -> int:
    """``4096``, ``"4096"``, ``"64k"``, ``"1GiB"`` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a byte size, got {value!r}")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"{name} must be a byte size like 4096, 64k, 512MiB or 1GiB, got {value!r}"
        )
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _coerce(name: str, value: Any) -> Any:
    if name not in _FIELDS:
        known = ", ".join(sorted(_FIELDS))
        raise ConfigError(f"unknown setting {name!r}; known settings: {known}")
    if value is None:
        return None
    if name in _INT_FIELDS:
        if name.endswith("_bytes"):
            return parse_size(value, name)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if name == "log_level":
        return str(value).lower()
    return str(value)


def read_toml(path: str) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys, or a ``[cacheservice]`` table."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return data.get("cacheservice", data)


def from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings from CACHESERVICE_* variables. A variable that names no setting is left alone
    with a warning (it may be meant for a client, or be a typo worth fixing), never fatal."""
    out: dict[str, Any] = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in CLIENT_ENV:
                continue  # the config file path (load_config reads it) or a client's setting
            if name not in _FIELDS:
                near = difflib.get_close_matches(name, list(_FIELDS), n=1)
                hint = f"; did you mean {ENV_PREFIX}{near[0].upper()}?" if near else ""
                log.warning("ignoring %s: no such setting%s", key, hint)
                continue
            out[name] = value
    return out


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServiceConfig:
    """Merge the layers; ``overrides`` (CLI flags) whose value is None are treated as unset."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG")
    merged: dict[str, Any] = {}
    layers = [read_toml(path) if path else {}, from_env(env), dict(overrides or {})]
    for layer in layers:
        for name, value in layer.items():
            if value is not None:
                merged[name] = _coerce(name, value)
    try:
        return ServiceConfig(**merged)
    except TypeError as e:
        raise ConfigError(str(e)) from None
