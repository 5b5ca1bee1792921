"""Delta cycles acknowledged once staged whose apply is still running, by VM.

A plain delta cycle (no recovery point, not a planned failover's last, not verified, up
to 256 MiB, with room for it in the replica's storage) is acknowledged as soon as it is
staged durably (replica.receiver): the primary releases its tracking point and is done,
and the apply into the heads follows on the same thread, under the VM's lock.
Everything that operates on the heads takes that lock and so waits for the apply (a
failover, a recovery point, the next cycle, a removal); the views of a VM (``vm show``,
``status``, ``measure``, the points) do not take the lock (an initial copy holds it for
hours) and wait here instead, so that nobody sees a VM's replica as of before a cycle
it has acknowledged. A crash during the apply loses nothing: the stage is applied again
at start-up (replica.recovery, invariant 1).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

WAIT = 120.0      # seconds a view waits for an apply at most (then it shows what is)


class Applies:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._running: dict[str, threading.Event] = {}

    @contextmanager
    def running(self, key: str) -> Iterator[None]:
        """``with applies.running(key):`` the apply of VM ``key``'s acknowledged cycle."""
        done = threading.Event()
        with self._guard:
            self._running[key] = done
        try:
            yield
        finally:
            with self._guard:
                if self._running.get(key) is done:
                    del self._running[key]
            done.set()

    def wait(self, key: str, timeout: float = WAIT) -> bool:
        """Wait until VM ``key`` has no acknowledged cycle being applied (True), or
        ``timeout`` seconds (False)."""
        with self._guard:
            done = self._running.get(key)
        return done is None or done.wait(timeout)

    def wait_all(self, timeout: float = WAIT) -> bool:
        """Wait until no VM has an acknowledged cycle being applied, at most ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._guard:
            pending = list(self._running.values())
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in pending)
