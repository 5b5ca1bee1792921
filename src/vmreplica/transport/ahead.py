"""A cycle stream produced on a thread of its own, ahead of the thread that consumes it.

Both ends of a cycle do two things at once: the primary reads, checksums and compresses
while it sends; the replica takes records off the connection and verifies them while it
writes the previous ones into the heads. TLS, BLAKE3, zstd, preads and libnbd's waits
all run without the GIL, so a second thread overlaps them on two cores.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

_END = object()


def ahead(items: Iterable, depth: int, name: str, join_timeout: float = 30.0) -> Iterator:
    """Yield ``items``, produced on a thread named ``name`` at most ``depth`` ahead.

    An error while producing is raised here, to the consumer. When the consumer stops
    early (an error of its own, or it closes the generator), the producer stops at its
    next item; one blocked in a read (a connection) ends with what it reads from, and is
    waited for at most ``join_timeout`` seconds."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_END)
        except BaseException as e:  # noqa: BLE001 — handed to the consumer
            offer(e)

    t = threading.Thread(target=produce, name=name, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(join_timeout)
