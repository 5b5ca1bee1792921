"""The cycle scheduler: runs each replicating relationship's cycle at its frequency.

One thread wakes twice a second, starts a worker for every relationship that is due
and has no cycle running; a failed cycle is retried at the next due time (the changes
stay tracked). Manual `sync` and scheduled cycles share the VM lock, so they never overlap.
"""

from __future__ import annotations

import logging
import threading
import time

from ..domain.schedule import next_due
from ..domain.states import CYCLING, State

log = logging.getLogger("vmreplica.scheduler")


class Scheduler:
    def __init__(self, host, tick: float = 0.5):
        self.host = host
        self.tick = tick
        self._running: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        for t in list(self._running.values()):
            t.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.run_due(time.time())
                self.close_idle_heads()
            except Exception:  # noqa: BLE001 — the scheduler must keep going
                log.exception("scheduler pass failed")

    def run_due(self, now: float) -> list[str]:
        started = []
        for rel in self.host.store.relationships():
            if rel["role"] != "primary" or State(rel["state"]) not in CYCLING:
                continue
            vm = rel["vm"]
            t = self._running.get(vm)
            if t is not None and t.is_alive():
                continue
            last = rel.get("last_attempt_at")
            if now < next_due(last, int(rel.get("frequency", 300))):
                continue
            # Mark the attempt first so a failing cycle is not retried in a tight loop.
            self.host.store.update_relationship(vm, last_attempt_at=now)
            t = threading.Thread(target=self._cycle, args=(vm,), name=f"cycle-{vm}", daemon=True)
            self._running[vm] = t
            t.start()
            started.append(vm)
        return started

    def close_idle_heads(self) -> None:
        """Replica side: close the head servers that no cycle used for a while."""
        for vm in self.host.heads.idle_vms():
            lock = self.host.vm_lock(vm)
            if lock.acquire(blocking=False):
                try:
                    if vm in self.host.heads.idle_vms():
                        self.host.heads.close(vm)
                finally:
                    lock.release()

    def _cycle(self, vm: str) -> None:
        from ..primary.cycle import run_cycle
        try:
            run_cycle(self.host, vm)
        except Exception as e:  # noqa: BLE001 — recorded in the store by run_cycle
            log.warning("scheduled cycle of %s failed: %s", vm, getattr(e, "message", e))
