"""Asynchronous per-request loads for connectors whose loads may span engine steps (the blend
connector: its chunks are fetched, re-rotated and partly recomputed before the request runs).
vLLM keeps such a request waiting until ``get_finished`` reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

S = TypeVar("S")


class Loads(Generic[S]):
    """Per-request loads run one at a time on a background thread and collected on the engine's
    thread: ``finish(spec, future)`` runs there once a load is done and returns the engine
    blocks it did not fill, which vLLM then recomputes (``take_errors``)."""

    def __init__(self, thread_name: str, finish: Callable[[S, Future], Iterable[int]]):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._finish = finish
        self._loading: dict[str, tuple[S, Future]] = {}
        self._errors: set[int] = set()

    def start(self, req_id: str, spec: S, load: Callable[[S], object]) -> None:
        self._loading[req_id] = (spec, self._pool.submit(load, spec))

    def finished(self) -> set[str] | None:
        finished: set[str] = set()
        for req_id, (spec, fut) in list(self._loading.items()):
            if not fut.done():
                continue
            del self._loading[req_id]
            self._errors.update(self._finish(spec, fut))
            finished.add(req_id)
        return finished or None

    def take_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
