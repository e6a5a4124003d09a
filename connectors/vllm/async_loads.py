"""Per-request loads for connectors whose loads span an engine step (the blend connector: its
chunks are fetched in ``start_load_kv``, re-rotated and partly recomputed in ``get_finished``,
and the request runs in a later step). vLLM keeps such a request waiting until
``get_finished`` reports it.

The fetch runs on the engine's thread, not on a helper thread: while a request waits for its
KV, vLLM's step loop spins holding the GIL, and a helper thread then waits a whole switch
interval (5 ms) for every call that released it (each socket read, each xxh3, each torch op):
a 10-block chunk read took ~0.3 s that way against ~10 ms on the engine's thread. Calls to the
service inside the step run under the connector's short step timeout behind its gate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Generic, TypeVar

S = TypeVar("S")


class Loads(Generic[S]):
    """``start`` runs a request's load now and keeps its outcome (a value or the exception it
    raised); ``finished`` hands each outcome to ``finish(spec, future)`` on the engine's
    thread, which returns the engine blocks it did not fill: vLLM recomputes them
    (``take_errors``)."""

    def __init__(self, finish: Callable[[S, Future], Iterable[int]]):
        self._finish = finish
        self._loading: dict[str, tuple[S, Future]] = {}
        self._errors: set[int] = set()

    def start(self, req_id: str, spec: S, load: Callable[[S], object]) -> None:
        fut: Future = Future()
        try:
            fut.set_result(load(spec))
        except Exception as e:  # finish() decides: a failed load is recomputed, never fatal
            fut.set_exception(e)
        self._loading[req_id] = (spec, fut)

    def finished(self) -> set[str] | None:
        finished: set[str] = set()
        for req_id, (spec, fut) in list(self._loading.items()):
            del self._loading[req_id]
            self._errors.update(self._finish(spec, fut))
            finished.add(req_id)
        return finished or None

    def take_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def close(self) -> None:
        self._loading.clear()
