"""The engines beside this service and the routing question: where is a prompt cheapest?

Each engine's connector registers the engine (its KV-event endpoints and namespace); a feed
per engine (engine_feed.py) keeps what that engine's own cache holds, as our keys. A route
puts the two halves of the design together: for every engine of the prompt's namespace, the
blocks it already holds (free), then the blocks the service's tiers can load into it from
the arena, disk or the shared tier (bytes over each tier's measured read rate, tiers/rates.py),
then the tokens it must compute (over the prefill rate the caller gives, or the configured
one). The best engine is the cheapest connected one; the per-engine costs are returned too,
so a router can add what only it knows (queue depth, load).
"""

from __future__ import annotations

import re

from cacheservice.errors import BadRequest, Overloaded, ServiceUnavailable
from cacheservice.namespaces import NamespaceRegistry
from cacheservice.results import EngineRoute, EngineSpec, RouteResult
from index.engines import EngineBlocks
from index.radix import PrefixTree
from tiers.rates import ReadRates

_ENGINE_ID = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")
_ENDPOINT = re.compile(r"^(tcp://[A-Za-z0-9.\-\[\]:]+:\d{1,5}|ipc://[^\x00]{1,200})$")


def check_spec(spec: EngineSpec) -> None:
    if not _ENGINE_ID.match(spec.engine):
        raise BadRequest(
            f"engine id {spec.engine[:40]!r} must be 1-128 characters of letters, digits and ._:@/-"
        )
    for what, endpoint in (("endpoint", spec.endpoint), ("replay_endpoint", spec.replay_endpoint)):
        if endpoint is not None and (not _ENDPOINT.match(endpoint) or "*" in endpoint):
            raise BadRequest(
                f"{what} {endpoint[:80]!r} must be tcp://host:port or ipc://path of the "
                "engine's KV-event publisher, its '*' replaced by the engine's address"
            )
    if len(spec.topic) > 256 or len(spec.url) > 2048:
        raise BadRequest("topic must be at most 256 and url at most 2048 characters")


class Fleet:
    def __init__(
        self,
        tree: PrefixTree,
        namespaces: NamespaceRegistry,
        rates: ReadRates,
        *,
        max_engines: int = 64,
        prefill_tokens_per_s: float = 20000.0,
        max_blocks_per_engine: int = 1 << 20,
    ) -> None:
        self.tree = tree
        self.namespaces = namespaces
        self.rates = rates
        self.max_engines = max_engines
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.max_blocks_per_engine = max_blocks_per_engine
        self.feeds: dict = {}  # engine id -> EngineFeed

    def __len__(self) -> int:
        return len(self.feeds)

    async def register(self, spec: EngineSpec) -> bool:
        """Follow ``spec``'s events; False when it is registered already with the same spec
        (connectors re-register periodically, so a restarted service learns its engines)."""
        check_spec(spec)
        namespace, _ = self.namespaces.get(spec.ns)
        old = self.feeds.get(spec.engine)
        if old is not None and old.spec == spec:
            return False
        if old is None and len(self.feeds) >= self.max_engines:
            raise Overloaded(
                f"{len(self.feeds)} engines are registered (max {self.max_engines}): "
                "unregister engines that are gone, or restart with a higher limit"
            )
        try:
            from cacheservice.engine_feed import EngineFeed
        except ImportError as e:  # pyzmq is the events extra
            raise ServiceUnavailable(
                f"engine events need pyzmq ({e}): pip install 'cacheservice[events]'"
            ) from None
        if old is not None:
            await old.close()  # the engine moved (restarted elsewhere): start over
        blocks = EngineBlocks(namespace.seed, namespace.block_tokens, self.max_blocks_per_engine)
        feed = EngineFeed(spec, blocks)
        self.feeds[spec.engine] = feed
        feed.start()
        return True

    async def unregister(self, engine: str) -> bool:
        feed = self.feeds.pop(engine, None)
        if feed is not None:
            await feed.close()
        return feed is not None

    async def close(self) -> None:
        for engine in list(self.feeds):
            await self.unregister(engine)

    def describe(self) -> list[dict]:
        out = []
        for feed in self.feeds.values():
            stats = vars(feed.stats)
            out.append(
                {
                    **vars(feed.spec),
                    "connected": feed.connected,
                    "blocks": len(feed.blocks),
                    "last_seq": feed.last_seq,
                    "unmapped": feed.blocks.unmapped,
                    **stats,
                }
            )
        return out

    def route(
        self,
        ns: str,
        keys: list[bytes],
        num_tokens: int | None = None,
        prefill_tokens_per_s: float | None = None,
    ) -> RouteResult:
        namespace, block_bytes = self.namespaces.get(ns)
        bt = namespace.block_tokens
        total = len(keys) * bt if num_tokens is None else num_tokens
        if total < len(keys) * bt:
            raise BadRequest(f"num_tokens={total} is fewer than the {len(keys)} keys' tokens")
        rate = prefill_tokens_per_s or self.prefill_tokens_per_s
        if rate <= 0:
            raise BadRequest("prefill_tokens_per_s must be positive")
        match = self.tree.match(keys)
        routes = []
        for feed in self.feeds.values():
            if feed.spec.ns != ns:
                continue
            gpu = feed.blocks.run(keys) if feed.connected else 0
            counts: dict[str, int] = {}
            for tier in match.tiers[gpu:]:
                counts[tier] = counts.get(tier, 0) + 1
            load_s = sum(self.rates.seconds(t, n * block_bytes) for t, n in counts.items())
            computed = total - max(gpu, match.length) * bt
            routes.append(
                EngineRoute(
                    feed.spec.engine,
                    feed.spec.url,
                    feed.connected,
                    gpu * bt,
                    {t: n * bt for t, n in counts.items()},
                    computed,
                    load_s + computed / rate,
                )
            )
        live = [r for r in routes if r.connected]
        best = min(live, key=lambda r: (r.cost_s, -r.gpu_tokens, r.engine), default=None)
        return RouteResult(best.engine if best else None, total, routes)
