"""Data buffers reused from one cycle to the next.

A cycle moves its data through buffers of 64 KiB to 1 MiB: the primary reads the changed
extents into them, the replica decompresses records into them. Allocated afresh, every
page of them is a first touch (a page fault and a zeroed page); on a virtual machine
that costs microseconds a page, as much as the rest of a 64 MiB delta's path
(bench/bench_floor.py: `touch-fresh` against `touch-reused`). So the daemon keeps the
buffers it is given back, up to ``LIMIT`` bytes, and hands them out again.

Handing a buffer back is an optimisation, never a duty: one that is dropped is garbage
collected. Only give back a buffer nothing refers to any more (no request in flight, no
record still to be applied).
"""

from __future__ import annotations

import threading

LIMIT = 64 << 20          # bytes kept for reuse, per process
SMALLEST = 64 << 10       # buffers come in powers of two from here


def _size_class(n: int) -> int:
    size = SMALLEST
    while size < n:
        size <<= 1
    return size


class BufferPool:
    def __init__(self, limit: int = LIMIT):
        self.limit = limit
        self._free: dict[int, list[bytearray]] = {}
        self._kept = 0
        self._lock = threading.Lock()

    def get(self, n: int) -> memoryview:
        """A writable view of exactly ``n`` bytes (its contents are not zeroed)."""
        size = _size_class(n)
        with self._lock:
            free = self._free.get(size)
            buf = free.pop() if free else None
            if buf is not None:
                self._kept -= size
        if buf is None:
            buf = bytearray(size)
        return memoryview(buf)[:n]

    def put(self, view) -> None:
        """Give back a view ``get`` returned (anything else is ignored)."""
        if not isinstance(view, memoryview) or not isinstance(view.obj, bytearray):
            return
        buf = view.obj
        size = len(buf)
        if size != _size_class(size):
            return
        try:
            view.release()     # any later use of this view raises instead of reading reuse
        except BufferError:
            return             # still exported (a request in flight): not reusable yet
        with self._lock:
            if self._kept + size <= self.limit:
                self._free.setdefault(size, []).append(buf)
                self._kept += size

    @property
    def kept(self) -> int:
        return self._kept


POOL = BufferPool()
