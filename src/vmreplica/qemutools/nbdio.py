"""NBD over libnbd: connect to an export, read block status, read and write with many
requests in flight (one request at a time is round-trip bound; 16 is the sweet spot on
two cores). Errors become ``OperationError``s that name the export.

Requests are given plain buffers (bytes, bytearray, memoryview), never ``nbd.Buffer``:
with libnbd 1.14's Python bindings (Debian 12) every ``aio_pread``/``aio_pwrite`` of an
``nbd.Buffer`` keeps that buffer alive for ever, so a daemon leaked every byte it
replicated (2 GiB after a 2 GiB initial copy); a plain buffer is released when its
request completes (tests/integration/test_nbdio.py). ``nbd.Buffer`` is still used, briefly,
for its fast ``is_zero`` (``is_zero`` below).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator

from ..errors import OperationError, StorageFull

log = logging.getLogger("vmreplica.nbd")

IN_FLIGHT = 16
STATUS_CHUNK = 1 << 30


def connect(socket_path: str | os.PathLike[str], export: str, contexts: Iterable[str] = ()):
    import nbd
    h = nbd.NBD()
    h.set_export_name(export)
    for c in contexts:
        h.add_meta_context(c)
    try:
        h.connect_unix(str(socket_path))
    except nbd.Error as e:
        raise OperationError(f"cannot open NBD export {export} on {socket_path}: {e}") from None
    for c in contexts:
        if not h.can_meta_context(c):
            h.shutdown()
            raise OperationError(f"NBD export {export} does not offer {c}")
    return h


def is_zero(data, offset: int = 0, size: int = -1) -> bool:
    """Whether ``data[offset:offset + size]`` (a bytes-like object) is all zero bytes:
    libnbd's fast check, through a short-lived nbd.Buffer that shares ``data``."""
    import nbd
    return nbd.Buffer.from_buffer(data).is_zero(offset, size)


def block_status(h, context: str, size: int | None = None) -> list[tuple[int, int, int]]:
    """All runs (offset, length, flags) of ``context`` over the whole export."""
    import nbd
    size = h.get_size() if size is None else size
    runs: list[tuple[int, int, int]] = []
    pos = 0
    while pos < size:
        got: list[tuple[int, list[int]]] = []

        def cb(meta, offset, entries, err, got=got):
            if meta == context:
                got.append((offset, list(entries)))
            return 0

        try:
            h.block_status(min(STATUS_CHUNK, size - pos), pos, cb)
        except nbd.Error as e:
            raise OperationError(f"block status of {context} failed at {pos}: {e}") from None
        if not got:
            raise OperationError(f"the export did not report {context} at offset {pos}")
        off, entries = got[0]
        advanced = 0
        for i in range(0, len(entries) - 1, 2):
            length, flags = entries[i], entries[i + 1]
            length = min(length, size - (off + advanced))
            if length <= 0:
                break
            runs.append((off + advanced, length, flags))
            advanced += length
        if advanced == 0:
            raise OperationError(f"block status of {context} made no progress at {pos}")
        pos = off + advanced
    return runs


def read_extents(h, extents: Iterable[tuple[int, int]], depth: int = IN_FLIGHT,
                 pool=None) -> Iterator[tuple[int, int, bytearray | memoryview]]:
    """Yield (offset, length, buffer) for each extent, in order, ``depth`` in flight.

    ``buffer`` is what the data was read into (no copy): a new bytearray, or a view from
    ``pool`` (a ``buffers.BufferPool``) that the caller may give back to it.
    """
    import nbd
    queue: deque = deque()
    it = iter(extents)
    exhausted = False
    while True:
        while not exhausted and len(queue) < depth:
            try:
                off, ln = next(it)
            except StopIteration:
                exhausted = True
                break
            buf = pool.get(ln) if pool is not None else bytearray(ln)
            try:
                cookie = h.aio_pread(buf, off)
            except nbd.Error as e:
                raise OperationError(f"reading {ln} bytes at {off} failed: {e}") from None
            queue.append((cookie, off, ln, buf))
        if not queue:
            return
        cookie, off, ln, buf = queue[0]
        while True:
            try:
                done = h.aio_command_completed(cookie)
            except nbd.Error as e:
                raise OperationError(f"reading {ln} bytes at {off} failed: {e}") from None
            if done:
                break
            h.poll(-1)
        queue.popleft()
        yield off, ln, buf


class Writer:
    """Asynchronous writes and zeroes on one export, ``depth`` in flight, then flush."""

    def __init__(self, h, name: str, depth: int = IN_FLIGHT):
        self.h, self.name, self.depth = h, name, depth
        self.size = h.get_size()
        self._cookies: deque = deque()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            from ..errors import IntegrityError
            raise IntegrityError(f"extent {offset}+{length} is past the end of {self.name} "
                                 f"({self.size} bytes)")

    def _throttle(self) -> None:
        import nbd
        while self.h.aio_in_flight() >= self.depth:
            self.h.poll(-1)
        while self._cookies:
            try:
                if not self.h.aio_command_completed(self._cookies[0][0]):
                    break
            except nbd.Error as e:
                raise _write_error(self.name, e) from None
            self._cookies.popleft()

    def write(self, offset: int, data) -> None:
        self._check_range(offset, len(data))
        self._throttle()
        # Shared, not copied: the caller does not touch ``data`` until drain(). A plain
        # buffer, never an nbd.Buffer (see the module's docstring).
        self._cookies.append((self.h.aio_pwrite(data, offset), data))  # keep data alive

    def zero(self, offset: int, length: int, trim: bool = True) -> None:
        import nbd
        self._check_range(offset, length)
        self._throttle()
        flags = 0 if trim else nbd.CMD_FLAG_NO_HOLE
        self._cookies.append((self.h.aio_zero(length, offset, flags=flags), None))

    def drain(self) -> None:
        import nbd
        while self._cookies:
            c = self._cookies[0][0]
            try:
                if self.h.aio_command_completed(c):
                    self._cookies.popleft()
                    continue
            except nbd.Error as e:
                raise _write_error(self.name, e) from None
            self.h.poll(-1)

    def flush(self) -> None:
        import nbd
        self.drain()
        try:
            self.h.flush()
        except nbd.Error as e:
            raise _write_error(self.name, e, "flushing") from None


def _write_error(name: str, e, what: str = "writing") -> OperationError:
    import errno
    if getattr(e, "errnum", None) == errno.ENOSPC:   # nbd.Error: .errno is the name
        return StorageFull(f"{what} {name}: no space left on the device")
    return OperationError(f"{what} {name} failed: {e}")


def close(h, timeout: float = 10.0) -> bool:
    """Disconnect politely, but never wait more than ``timeout`` for the server to close
    (``shutdown`` would wait for ever on a server that stopped answering); the socket
    itself goes with the handle. Returns whether the server closed in time."""
    import nbd
    try:
        if h.aio_is_closed() or h.aio_is_dead():
            return True
        h.aio_disconnect(0)
        deadline = time.monotonic() + timeout
        while not (h.aio_is_closed() or h.aio_is_dead()):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("an NBD server did not close the connection within %.0f s of "
                            "the disconnect; dropped", timeout)
                return False
            h.poll(int(min(left, 1.0) * 1000) or 1)
    except nbd.Error:        # closing a broken connection is best effort
        pass
    except Exception:  # noqa: BLE001 — e.g. a handle that never connected
        pass
    return True

