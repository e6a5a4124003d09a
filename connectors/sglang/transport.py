"""Page transports for the SGLang backend: move HiCache pages between SGLang's host pool and
cacheservice, either through the shared-memory arena (same host, zero copy on the service
side: one memcpy per host-pool buffer) or through HTTP bodies (remote service, or no arena).

A page is a list of ``Segment`` (raw address, byte count) in the order SGLang's host pool
names them; its stored bytes are the segments concatenated. Addresses come from SGLang
(``get_page_buffer_meta``) or from a CPU tensor the caller keeps alive during the call.

Contract shared by both transports: ``write`` returns one flag per page (True: the page is
stored now, written by us or already there); ``read`` fills the longest present prefix of
``pages`` and returns its length, never touching a page past it. Both raise
``CacheServiceError`` (the backend turns it into a miss); neither keeps page memory after
returning.
"""

from __future__ import annotations

import contextlib
import ctypes
from abc import ABC, abstractmethod
from typing import NamedTuple

import xxhash

from cacheservice.arena import ArenaClient, ArenaView
from cacheservice.client import CacheClient
from cacheservice.errors import CacheServiceError, ServiceUnavailable, TooLarge


class Segment(NamedTuple):
    ptr: int
    nbytes: int


Page = list[Segment]


def page_bytes(page: Page) -> int:
    return sum(s.nbytes for s in page)


def gather(page: Page) -> bytes:
    return b"".join(ctypes.string_at(s.ptr, s.nbytes) for s in page)


def scatter(page: Page, src: int) -> None:
    """Copy the page's bytes from ``src`` into its segments."""
    for seg in page:
        ctypes.memmove(seg.ptr, src, seg.nbytes)
        src += seg.nbytes


def gather_into(page: Page, dst: int) -> None:
    """Copy the page's segments, concatenated, to ``dst``."""
    for seg in page:
        ctypes.memmove(dst, seg.ptr, seg.nbytes)
        dst += seg.nbytes


def _settle(client: CacheClient, ns: str, keys: list[bytes]) -> list[bool]:
    """Per-page flags when the store call could not say which pages made it."""
    count = client.exists(ns, keys)
    return [i < count for i in range(len(keys))]


class Transport(ABC):
    @abstractmethod
    def write(self, ns: str, keys: list[bytes], parent: bytes, pages: list[Page]) -> list[bool]:
        """Store ``pages`` under ``keys`` (a chain continuing ``parent``)."""

    @abstractmethod
    def read(self, ns: str, keys: list[bytes], pages: list[Page]) -> int:
        """Fill the longest stored prefix of ``keys`` into ``pages``; return its length."""

    def close(self) -> None:
        """Release mappings. Idempotent."""


class HttpTransport(Transport):
    """Pages travel in request bodies (``/v1/blocks/put``, ``/v1/blocks/get``)."""

    def __init__(self, client: CacheClient) -> None:
        self.client = client

    def write(self, ns: str, keys: list[bytes], parent: bytes, pages: list[Page]) -> list[bool]:
        data = b"".join(gather(p) for p in pages)
        stored = self.client.put_blocks(ns, keys, data, parent=parent)
        if stored == len(keys):
            return [True] * len(keys)
        return _settle(self.client, ns, keys)  # some were already stored, or did not fit

    def read(self, ns: str, keys: list[bytes], pages: list[Page]) -> int:
        res = self.client.get_blocks(ns, keys, prefix=True)
        data = res.data
        addr = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        done = 0
        for page in pages[: res.count]:
            size = page_bytes(page)
            if (done + 1) * size > len(data):
                break  # a short body is a miss from here on, never a partial page
            scatter(page, addr + done * size)
            done += 1
        return done


class ArenaTransport(HttpTransport):
    """Pages are copied straight between the host pool and arena slots that the service
    reserved (writes) or pinned under a lease (reads).

    SGLang asks for pages that continue a prefix the engine already holds (and stores each
    batch as its own chain when it gives no ``prefix_keys``), so reads acquire with
    ``flat=True``: keys need not form a path from the prefix tree's root. Pages the lease
    does not cover (a page that failed its checksum or geometry, and every page after it, or
    one the service could not promote into a full arena) are read with ``/v1/blocks/get``,
    which re-reads them from a lower tier or answers a miss.
    ``pages_zero_copy`` / ``pages_http`` count the pages each way filled."""

    def __init__(self, client: CacheClient, path: str) -> None:
        super().__init__(client)
        self.path = path
        self._arena = ArenaClient(path)
        self.pages_zero_copy = 0
        self.pages_http = 0

    def _current(self) -> tuple[ArenaView, int]:
        """The mapping of the arena file now at ``path`` and its first payload's address."""
        view = self._arena.current()
        first = view.payload(0, 1)
        anchor = ctypes.c_char.from_buffer(first)
        base = ctypes.addressof(anchor)
        del anchor
        first.release()
        return view, base

    def _slot_addr(self, view: ArenaView, base: int, slot: int, length: int) -> int:
        if length > view.max_payload:
            raise TooLarge(f"page of {length} bytes exceeds the arena slot payload")
        view.payload(slot, length)  # bounds check; raises BadRequest for a bad slot
        return base + slot * view.slot_bytes

    def write(self, ns: str, keys: list[bytes], parent: bytes, pages: list[Page]) -> list[bool]:
        view, base = self._current()
        res = self.client.reserve(ns, keys, parent)
        ok = [slot is not None for slot in res.slots]
        try:
            if not self._arena.is_current(view):
                # The service restarted between our check and its answer: the slots it gave
                # are in a file we have not mapped, so writing now would publish garbage.
                raise ServiceUnavailable(f"arena {self.path} was replaced during a store")
            sums: list[int | None] = []
            for slot, page in zip(res.slots, pages, strict=True):
                csum = None
                if slot is not None:
                    n = page_bytes(page)
                    start = self._slot_addr(view, base, slot, n)
                    gather_into(page, start)
                    csum = xxhash.xxh3_64_intdigest((ctypes.c_char * n).from_address(start))
                sums.append(csum)
        except BaseException:
            with contextlib.suppress(CacheServiceError):
                if res.lease:
                    self.client.release(res.lease)  # aborts the reservation, frees its slots
            raise
        committed = self.client.commit(res.lease, ok, sums) if any(ok) else 0
        if all(ok) and committed == len(keys):
            return [True] * len(keys)
        return _settle(self.client, ns, keys)  # None slots: already stored, or no space

    def read(self, ns: str, keys: list[bytes], pages: list[Page]) -> int:
        view, base = self._current()
        acq = self.client.acquire(ns, keys, flat=True)
        done = 0
        try:
            for slot, csum, length, page in zip(
                acq.slots, acq.checksums, acq.lengths, pages, strict=False
            ):
                if length != page_bytes(page):
                    break  # another page geometry: a miss, never a partial copy
                src = self._slot_addr(view, base, slot, length)
                if xxhash.xxh3_64_intdigest((ctypes.c_char * length).from_address(src)) != csum:
                    break
                scatter(page, src)
                done += 1
        finally:
            with contextlib.suppress(CacheServiceError):  # else the lease expires on its own
                if acq.lease:
                    self.client.release(acq.lease)
        self.pages_zero_copy += done
        if done == len(keys):
            return done
        more = super().read(ns, keys[done:], pages[done:])
        self.pages_http += more
        return done + more

    def close(self) -> None:
        self._arena.close()
