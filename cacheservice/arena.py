"""A client's mapping of the service's shared-memory arena (engines on the same host).

The service owns the arena (tiers/host.py): it allocates slots and is the only one to create,
truncate or unlink the file. A client maps it read/write, copies payloads into slots a reserve
gave it and out of slots an acquire pinned for it, and never touches any other slot.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading

from cacheservice.errors import BadRequest, ServiceUnavailable, TooLarge
from tiers.base import ARENA_HEADER, ARENA_MAGIC, ARENA_VERSION, HEADER_BYTES


def _close_map(mm: mmap.mmap) -> None:
    # A caller may still hold a payload memoryview; the mapping then lives until that view
    # and the mmap object are garbage collected, which unmaps it.
    try:
        mm.close()
    except BufferError:
        pass


class ArenaView:
    """A client's mapping of the service's arena (another process on the same host). Reads
    and writes payloads zero copy; never allocates slots and never unlinks the file."""

    def __init__(self, path: str, mm: mmap.mmap, slot_bytes: int, num_slots: int, data_offset: int):
        self.path = path
        self.ident: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file mapped
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.data_offset = data_offset
        self.max_payload = slot_bytes - HEADER_BYTES
        self._map = mm
        self._view = memoryview(mm)

    @classmethod
    def open(cls, path: str) -> ArenaView:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as e:
            raise BadRequest(
                f"no arena at {path}: use the arena.path the service returned on register"
            ) from e
        try:
            head = os.pread(fd, ARENA_HEADER.size, 0)
            if len(head) < ARENA_HEADER.size:
                raise BadRequest(f"{path} is too short to be a cacheservice arena")
            magic, version, slot_bytes, num_slots, data_offset = ARENA_HEADER.unpack(head)
            if magic != ARENA_MAGIC or version != ARENA_VERSION:
                raise BadRequest(
                    f"{path} is not a version-{ARENA_VERSION} cacheservice arena "
                    f"(magic {magic!r}, version {version}): upgrade the client or service"
                )
            size = data_offset + num_slots * slot_bytes
            if os.fstat(fd).st_size < size:
                raise BadRequest(f"arena {path} is truncated: restart the service")
            # Map every page now: a first touch of each 4 KiB page of the shared file costs a
            # fault (~0.5 us), which on a 1 GiB load would take longer than the copy itself.
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            # MAP_POPULATE maps the pages for reading; the first write into each still faults
            # (a write into 256 MiB of fresh slots ran at 3 GiB/s, 5 GiB/s once mapped).
            # MADV_POPULATE_WRITE (Linux >= 5.14) maps them writable, changing no byte.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                mm.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        view = cls(path, mm, slot_bytes, num_slots, data_offset)
        view.ident = (st.st_dev, st.st_ino)
        return view

    def whole(self) -> memoryview:
        """The whole mapping (for callers that index slots themselves, e.g. torch views)."""
        return self._view

    def payload(self, slot: int, length: int | None = None) -> memoryview:
        if not 0 <= slot < self.num_slots:
            raise BadRequest(f"slot {slot} outside the arena's [0, {self.num_slots})")
        n = self.max_payload if length is None else length
        if not 0 <= n <= self.max_payload:
            raise TooLarge(f"length {n} exceeds the slot payload {self.max_payload} bytes")
        start = self.data_offset + slot * self.slot_bytes + HEADER_BYTES
        return self._view[start : start + n]

    def close(self) -> None:
        self._view.release()
        _close_map(self._map)

    def __enter__(self) -> ArenaView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_ident(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ServiceUnavailable(f"arena {path} is gone: {e}") from e
    return st.st_dev, st.st_ino


class ArenaClient:
    """The arena file at ``path`` as it is now, for every connector. A restarted service
    replaces the file; bytes written into the old mapping would never reach it, so
    ``current`` remaps when the file changed, and ``is_current`` lets a writer re-check
    after its reserve (the service answered from the new file). Old mappings are retired,
    not unmapped: another thread may still be copying through one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._retired: list[ArenaView] = []
        self._view = ArenaView.open(path)

    def current(self) -> ArenaView:
        ident = file_ident(self.path)
        with self._lock:
            if ident != self._view.ident:
                self._retired.append(self._view)
                self._view = ArenaView.open(self.path)
            return self._view

    def is_current(self, view: ArenaView) -> bool:
        try:
            return file_ident(self.path) == view.ident
        except ServiceUnavailable:
            return False

    def close(self) -> None:
        with self._lock:
            views, self._retired = [self._view, *self._retired], []
        for view in views:
            view.close()
