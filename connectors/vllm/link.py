"""The worker's way to the service: a client with the normal timeout (commits, releases,
registration), one with the short timeout calls inside an engine step run under
(``step_timeout_s``), the gate that keeps a failing service out of the step, and the arena
the service's slots live in, remapped when a restarted service replaced its file.

An open gate is the only way a step reaches the service, so a dead or hung one costs at most
one step timeout, then nothing until its health probe answers again.
"""

from __future__ import annotations

import threading

from cacheservice.arena import ArenaClient, ArenaView
from cacheservice.client import CacheClient
from cacheservice.errors import UnknownNamespace
from connectors.gate import Gate
from connectors.vllm.scheduler import CacheLayout, Settings
from connectors.vllm.transfer import pin_arena


class ServiceLink:
    def __init__(self, settings: Settings, layout: CacheLayout, tp_rank: int) -> None:
        self.layout, self.rank = layout, tp_rank
        self.ns = layout.namespaces[tp_rank]
        self.client = CacheClient(settings.url, settings.token, timeout=settings.timeout_s)
        self.step_client = CacheClient(
            settings.url, settings.token, timeout=settings.step_timeout_s
        )
        self.gate = Gate(settings.retry_s, self.client.health)
        self.pin = False  # set once the KV cache is known to live on a GPU
        self._arena: ArenaClient | None = None
        self._lock = threading.Lock()
        self._pinned: dict[int, bool] = {}  # id(arena view) -> registered with CUDA

    def arena(self) -> ArenaView:
        """The arena as the service maps it now (registered on first use)."""
        with self._lock:
            if self._arena is None:
                info = self.client.register(self.ns, self.layout.block_bytes)
                self._arena = ArenaClient(info.arena["path"])
            view = self._arena.current()  # remapped if a restarted service replaced the file
            if self.pin and id(view) not in self._pinned:
                self._pinned[id(view)] = pin_arena(view)  # DMA straight from the arena
            return view

    def call(self, fn, *args):
        """A service call retried once after the service forgot the namespace (it restarted):
        the namespace is registered again, the arena remapped."""
        try:
            return fn(*args)
        except UnknownNamespace:
            with self._lock:
                self._arena = None
            self.arena()
            return fn(*args)

    def close(self) -> None:
        self.client.close()
        self.step_client.close()
