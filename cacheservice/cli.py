"""``cacheservice serve`` runs the service; ``cacheservice stats`` prints a running one's stats.

Settings come from defaults < ``--config`` TOML < ``CACHESERVICE_*`` env < flags (config.py).
SIGTERM/SIGINT stop the listeners first, then drain the write-down queue and close the tiers
(``CacheService.close`` through the app's cleanup context), so committed blocks reach disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import fields

from aiohttp import web

from cacheservice.config import DEFAULT_PORT, ConfigError, ServiceConfig, load_config
from cacheservice.errors import CacheServiceError
from cacheservice.tokens import TokenFileError
from tiers.base import TierStartError
from tiers.host import ArenaError

log = logging.getLogger("cacheservice")

_HELP = {
    "host": "TCP address to bind",
    "port": "TCP port (0 = no TCP, unix socket only)",
    "unix_socket": "also serve on this unix socket path (fastest for same-host engines)",
    "frames_socket": "same-host socket for engines' data-plane frames (PROTOCOL.md); 'auto' "
    "= ARENA_PATH.sock, 'none' = off",
    "token": "require this bearer token (visible in ps: prefer env CACHESERVICE_TOKEN)",
    "token_file": "token file used when no token is given, created 0600 at first start "
    "(default ~/.config/cacheservice/token; clients of the same user read it)",
    "auth": "'token' (default: bearer token required) or 'none' (any local user may "
    "read and write the cache)",
    "allowed_hosts": "comma-separated Host names accepted besides IP literals and localhost "
    "('*' = any; guards against DNS rebinding)",
    "arena_path": "shared-memory arena file (default /dev/shm/cacheservice-PORT)",
    "arena_bytes": "arena size, e.g. 1GiB",
    "slot_bytes": "arena slot size incl. 64-byte header, multiple of 4096 (max block + 64)",
    "disk_dir": "disk tier directory ('' = no disk tier)",
    "disk_bytes": "disk tier budget, e.g. 16GiB",
    "redis_url": "shared Redis tier, e.g. redis://host:6379/0 (default: none)",
    "redis_bytes": "Redis tier budget",
    "redis_mode": "'single' (one server, or a proxy), 'cluster' (native Redis Cluster; "
    "rediss:// TLS and user:password@ in the URL) or 'sentinel' (redis_url "
    "redis://[user:password@]sentinel:port[,sentinel:port]/master-name)",
    "max_body_bytes": "largest request body accepted (413 above)",
    "max_keys": "most keys in one request (413 above)",
    "lease_ms": "acquire/reserve leases expire after this many ms (also the most a client "
    "may ask for)",
    "remote_lookup_ms": "budget for asking a shared tier (Redis) about unknown keys during a "
    "lookup; slower answers finish in the background",
    "events_endpoint": "publish the tiers' block changes as vLLM KV events on this ZMQ PUB "
    "address, e.g. tcp://*:5567 (needs pyzmq: the events extra)",
    "events_replay_endpoint": "ZMQ ROUTER address answering replay requests for missed events",
    "events_topic": "topic of the published KV events",
    "max_engines": "most engines whose KV events the service follows (registered by connectors)",
    "prefill_tokens_per_s": "routing: an engine's prefill rate, the cost of a token not cached",
    "log_level": "debug, info, warning or error",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cacheservice", description="context-reuse KV cache service")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--config", help="TOML config file (top-level keys or [cacheservice])")
    defaults = ServiceConfig()
    for f in fields(ServiceConfig):
        default = getattr(defaults, f.name) if f.name != "arena_path" else None
        shown = "" if default in (None, "") or f.name == "token" else f" [default: {default}]"
        serve.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=_HELP[f.name] + shown)
    proxy = sub.add_parser("proxy", help="OpenAI-compatible front that plans prompts")
    proxy.add_argument("--upstream", required=True, help="the engine's OpenAI server URL")
    proxy.add_argument("--host", default="127.0.0.1")
    proxy.add_argument("--port", type=int, default=8000)
    proxy.add_argument("--service-url", default=None, help="cacheservice URL (planning)")
    proxy.add_argument("--token", default=os.environ.get("CACHESERVICE_TOKEN"))
    proxy.add_argument("--tokenizer", default=None, help="name or path [default: the model]")
    stats = sub.add_parser("stats", help="print a running service's /v1/stats as JSON")
    stats.add_argument("--url", default=None, help="http://host:port or unix:///path.sock")
    stats.add_argument("--token", default=os.environ.get("CACHESERVICE_TOKEN"))
    stats.add_argument("--timeout", type=float, default=5.0)
    return p


def _prepare_unix_socket(path: str) -> None:
    """Remove a socket file left by a crashed service; refuse if a live one answers on it."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise ConfigError(f"unix socket {path} is in use by a running service: pick another path")
    finally:
        probe.close()


def _listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), backlog=512)
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {e.strerror}; another service may own that "
            "port: stop it or pick another --port"
        ) from None


async def run_service(cfg: ServiceConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT), then shut down cleanly."""
    from cacheservice.server import create_app  # imports the tiers; keep `stats` light

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Listeners first: a service that cannot serve must not touch the arena or the tiers.
    sock = _listen(cfg.host, cfg.port) if cfg.port else None
    if cfg.unix_socket:
        _prepare_unix_socket(cfg.unix_socket)
    runner = web.AppRunner(create_app(cfg), handle_signals=False, access_log=None)
    try:
        await runner.setup()  # opens the tiers and rebuilds the index (cleanup_ctx)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    try:
        where = []
        if sock is not None:
            await web.SockSite(runner, sock).start()
            where.append(f"http://{cfg.host}:{cfg.port}")
        if cfg.unix_socket:
            await web.UnixSite(runner, cfg.unix_socket).start()
            os.chmod(cfg.unix_socket, 0o600)
            where.append(f"unix://{cfg.unix_socket}")
        log.info("cacheservice ready on %s (arena %s)", ", ".join(where), cfg.arena_path)
        await stop.wait()
        log.info("cacheservice shutting down: draining write-down to lower tiers")
    finally:
        await runner.cleanup()
        if cfg.unix_socket and os.path.exists(cfg.unix_socket):
            os.unlink(cfg.unix_socket)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("cacheservice stopped")


def _serve(args: argparse.Namespace) -> int:
    flags = {f.name: getattr(args, f.name) for f in fields(ServiceConfig)}
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    cfg = load_config(args.config, overrides=flags)
    logging.getLogger().setLevel(cfg.log_level.upper())
    if args.token:
        log.warning("--token is visible to every local user in ps; use CACHESERVICE_TOKEN")
    if cfg.auth == "none" and not cfg.token:
        log.warning("auth is 'none': every local user can read and write this cache")
    asyncio.run(run_service(cfg))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from cacheservice.client import CacheClient

    url = args.url or os.environ.get("CACHESERVICE_URL") or f"http://127.0.0.1:{DEFAULT_PORT}"
    with CacheClient(url, token=args.token, timeout=args.timeout) as client:
        print(json.dumps(client.stats(), indent=2, sort_keys=True, default=str))
    return 0


def _proxy(args: argparse.Namespace) -> int:
    from cacheservice.proxy import ProxyConfig, create_proxy_app

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    url = (
        args.service_url or os.environ.get("CACHESERVICE_URL") or f"http://127.0.0.1:{DEFAULT_PORT}"
    )
    config = ProxyConfig(args.upstream, url, args.token, args.tokenizer)
    web.run_app(create_proxy_app(config), host=args.host, port=args.port, access_log=None,
                print=lambda *_: log.info("proxy on http://%s:%d -> %s", args.host, args.port,
                                          args.upstream))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"serve": _serve, "proxy": _proxy, "stats": _stats}
    try:
        return commands[args.command](args)
    except (ConfigError, TokenFileError) as e:
        print(f"cacheservice: configuration error: {e}", file=sys.stderr)
        return 2
    except (ArenaError, TierStartError) as e:
        print(f"cacheservice: {e}", file=sys.stderr)
        return 2
    except (CacheServiceError, OSError) as e:
        print(f"cacheservice: {e}", file=sys.stderr)
        return 1
