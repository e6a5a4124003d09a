"""The circuit breaker every connector puts in front of the service.

A cache must never slow the engine down by more than it saves. After a failed or timed-out
call the gate closes: callers treat the service as a miss without touching it. Once the
back-off has passed, the next caller does not pay for finding out whether the service is
back: a background health probe (one at a time, on its own short timeout) decides, and only a
successful probe opens the gate again. Consecutive failures double the back-off up to
``max_retry_s``, so a service that stays dead or hung costs a few probes a minute and no
request latency at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from cacheservice.errors import ServiceUnavailable

log = logging.getLogger("cacheservice.connectors")


class Gate:
    def __init__(
        self,
        retry_s: float,
        probe: Callable[[], bool] | None = None,
        max_retry_s: float = 30.0,
    ):
        self.retry_s = retry_s
        self.max_retry_s = max(max_retry_s, retry_s)
        self._probe = probe
        self._backoff = retry_s
        self._closed_until = 0.0
        self._closed = False
        self._probing = False
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        if not self._closed:
            return True
        if time.monotonic() < self._closed_until:
            return False
        if self._probe is None:
            return True  # half-open: the next call is the probe
        with self._lock:
            if not self._probing:
                self._probing = True
                threading.Thread(target=self._run_probe, name="cs-probe", daemon=True).start()
        return False

    def _run_probe(self) -> None:
        try:
            ok = bool(self._probe())
        except Exception:
            ok = False
        with self._lock:
            self._probing = False
        if ok:
            self.succeeded()
        else:
            self._close()

    def succeeded(self) -> None:
        if self._closed:
            log.info("cacheservice reachable again")
        self._closed = False
        self._backoff = self.retry_s

    def failed(self, why: Exception) -> None:
        if not self._closed:
            log.warning("cacheservice unavailable, recomputing for %.1fs: %s", self.retry_s, why)
        self._close()

    def _close(self) -> None:
        was = self._closed
        self._closed = True
        self._closed_until = time.monotonic() + self._backoff
        if was:
            self._backoff = min(self._backoff * 2, self.max_retry_s)


WAITING = object()  # poll_lookup: the answer may still come; ask again next step


def poll_lookup(lookup: Future, wait_s: float, deadline: float, gate: Gate) -> Any:
    """One scheduler step's look at a lookup running off the step loop: its answer; WAITING
    while it may still come (the step goes on, vLLM asks again); None for a miss, past
    ``deadline`` or on a failure, which the gate learns of. Never raises, never blocks the
    step longer than ``wait_s``."""
    try:
        value = lookup.result(timeout=wait_s)
    except TimeoutError:
        if time.monotonic() < deadline:
            return WAITING
        gate.failed(TimeoutError("lookup past its deadline"))
    except ServiceUnavailable as e:
        gate.failed(e)
    except Exception as e:  # a rejected lookup or a bug here must not stop the engine
        log.error("cacheservice lookup failed, treating it as a miss: %r", e)
    else:
        gate.succeeded()
        return value
    return None
