"""The cycle scheduler: runs each replicating relationship's cycle at its frequency.

Cycles are anchored to the clock (domain.schedule): a relationship's slots are a stable
per-VM phase plus k × frequency, whatever the cycles took, so an on-time host misses
none and VMs with the same frequency are spread across the period. One thread wakes
twice a second and starts a worker for every relationship whose current slot has not
had its cycle and that has no cycle running; a cycle that overran finds the slots it
passed and runs once, late, then the schedule goes on; a failed cycle is retried at the
next slot (the changes stay tracked). Manual `sync` and scheduled cycles share the VM
lock, so they never overlap; a cycle run outside the schedule stands for the slots
due soon after it (domain.schedule.unscheduled_cover): a scheduled cycle that waited
for the lock behind one finds its slot covered and does not run.
"""

from __future__ import annotations

import logging
import threading
import time

from ..domain.links import is_dr
from ..domain.relationship import Relationship
from ..domain.schedule import due_slot, next_due
from ..domain.states import CYCLING, State

HEALTH_EVERY = 1.0           # seconds between health evaluations (changes become events)
EVENT_RETENTION = 30 * 86400  # events older than this are purged
SEED_POLL = 5  # seconds between asks whether an exported seed was imported
REDO_EVERY = 5.0  # seconds between tries to apply a staged cycle that could not be
                  # applied (replica.unapplied: a full storage, a failed sync)

# States of a primary relationship that runs no cycles but must still learn of a takeover.
WATCHED = {State.ERROR, State.READY_FOR_INITIAL}

log = logging.getLogger("vmreplica.scheduler")


class Scheduler:
    def __init__(self, host, tick: float = 0.5):
        self.host = host
        self.tick = tick
        self._running: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_health = 0.0
        self._last_cluster = 0.0
        self._last_purge = 0.0
        self._last_redo = 0.0
        self._last_revive = 0.0

    def start(self) -> None:
        # After a (re)start every replicating relationship runs a cycle at once, even in
        # a slot a manual cycle covered before the stop: it catches up, and a primary that
        # was replaced while it was down learns so (and is fenced).
        for rel in self.host.store.relationships():
            if rel.role == "primary" and State(rel.state) in CYCLING:
                self.host.store.update_relationship(rel.vm, last_attempt_at=None,
                                                    unscheduled_until=None)
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
                now = time.time()
                self.run_due(now)
                self.host.continuous.tick(now)
                if now - self._last_cluster >= 1.0:
                    self._last_cluster = now
                    from ..cluster.ops import tick as cluster_tick
                    threading.Thread(target=cluster_tick, args=(self.host,),
                                     name="cluster", daemon=True).start() \
                        if not self._cluster_busy() else None
                self.close_idle_heads()
                self.host.close_idle_parts()
                if self.host.mirror_targets and now - self._last_revive >= 1.0:
                    self._last_revive = now
                    self._revive_targets()
                if self.host.unapplied and now - self._last_redo >= REDO_EVERY:
                    self._last_redo = now
                    self.redo_unapplied()
                if now - self._last_health >= HEALTH_EVERY:
                    self._last_health = now
                    from .monitor import record_health_changes
                    record_health_changes(self.host)
                if now - self._last_purge >= 3600:
                    self._last_purge = now
                    self.keep_history(now)
            except Exception:  # noqa: BLE001 — the scheduler must keep going
                log.exception("scheduler pass failed")

    def run_due(self, now: float) -> list[str]:
        started = []
        for rel in self.host.store.relationships():
            if rel.role != "primary":
                continue
            if is_dr(rel.vm):
                from ..primary.dr import stand_by_if_moved
                if stand_by_if_moved(self.host, rel):
                    continue
            if rel.state == State.READY_FOR_INITIAL.value and rel.initial_at \
                    and now >= rel.initial_at:
                self._background(rel.vm, "initial", self._scheduled_initial, rel)
                continue
            if rel.state == State.INITIAL_IN_PROGRESS.value and rel.seed:
                if now >= next_due(rel.last_check_at, SEED_POLL):
                    self.host.store.update_relationship(rel.vm, last_check_at=now)
                    self._background(rel.vm, "seed", self._seed_imported, rel)
                continue
            if rel.state == State.RESYNC_REQUIRED.value and not rel.fenced:
                self._maybe_resync(rel, now)
                continue
            if State(rel.state) in WATCHED and not rel.fenced:
                self._watch(rel, now)
                continue
            if State(rel.state) not in CYCLING:
                continue
            if rel.mode == "continuous" and rel.sync_state != "idle":
                continue      # the mirror (primary.continuous) keeps this one current
            vm = rel.vm
            t = self._running.get(vm)
            if t is not None and t.is_alive():
                continue
            slot = due_slot(vm, rel.frequency, now, last_slot=rel.last_slot_at,
                            last_attempt=rel.last_attempt_at,
                            unscheduled_until=rel.unscheduled_until)
            if slot is None:
                continue
            # Mark the slot first: a failing cycle is retried at the next slot, not in a
            # tight loop, and a late one covers the slots it passed.
            self.host.store.update_relationship(vm, last_attempt_at=now, last_slot_at=slot)
            t = threading.Thread(target=self._cycle, args=(vm, slot), name=f"cycle-{vm}",
                                 daemon=True)
            self._running[vm] = t
            t.start()
            started.append(vm)
        return started

    def keep_history(self, now: float) -> dict:
        """Bounded history (README, "What is kept"), hourly: events kept 30 days, cycles
        in full a day, then per-hour aggregates 90 days (service.store.roll_up)."""
        return {"events_purged": self.host.store.purge_events(now - EVENT_RETENTION),
                "cycles_rolled_up": self.host.store.roll_up(now)}

    def _background(self, vm: str, what: str, fn, rel: Relationship) -> None:
        t = self._running.get(vm)
        if t is not None and t.is_alive():
            return

        def run():
            try:
                fn(rel)
            except Exception as e:  # noqa: BLE001 — recorded where it matters
                log.warning("%s of %s: %s", what, vm, getattr(e, "message", e))
        t = threading.Thread(target=run, name=f"{what}-{vm}", daemon=True)
        self._running[vm] = t
        t.start()

    def _scheduled_initial(self, rel: Relationship) -> None:
        from ..primary import seeding
        plan = rel.initial_plan or {}
        seeding.initial(self.host, rel.vm, method=plan.get("method") or "network",
                        path=plan.get("path"))

    def _seed_imported(self, rel: Relationship) -> None:
        from ..primary.seeding import imported
        from ..primary.standing import check_peer
        imported(self.host, rel.vm, check_peer(self.host, rel.vm))

    def _maybe_resync(self, rel: Relationship, now: float) -> None:
        """Resynchronise by itself when tracking broke — inside the resync window, and
        retried at the relationship's frequency after a failure."""
        from ..primary.resync import resync, window_open
        vm = rel.vm
        t = self._running.get(vm)
        if t is not None and t.is_alive():
            return
        if not window_open(rel, now):
            if rel.resync_window_seen and not rel.resync_window_missed:
                # The window came and went and the resync did not happen: critical.
                self.host.store.update_relationship(vm, resync_window_missed=True)
            return
        if rel.resync_window and not rel.resync_window_seen:
            self.host.store.update_relationship(vm, resync_window_seen=True)
        if now < next_due(rel.last_resync_attempt_at, rel.frequency):
            return
        # Staggered: one automatic resync at a time per host (they read whole disks).
        if any(t.is_alive() and t.name.startswith("resync-") for t in self._running.values()):
            return
        self.host.store.update_relationship(vm, last_resync_attempt_at=now)

        def run():
            try:
                resync(self.host, vm)
            except Exception as e:  # noqa: BLE001 — recorded by run_cycle
                log.warning("automatic resync of %s failed: %s", vm, getattr(e, "message", e))
        t = threading.Thread(target=run, name=f"resync-{vm}", daemon=True)
        self._running[vm] = t
        t.start()

    def _watch(self, rel: Relationship, now: float) -> None:
        """A primary that runs no cycles still asks its replica, once per frequency,
        whether it is the primary (it is fenced if not)."""
        if now < next_due(rel.last_check_at, rel.frequency):
            return
        self.host.store.update_relationship(rel.vm, last_check_at=now)
        from ..primary.standing import check_peer

        def check():
            try:
                check_peer(self.host, rel.vm, timeout=10)
            except Exception as e:  # noqa: BLE001 — recorded by check_peer when it matters
                log.info("peer check of %s: %s", rel.vm, getattr(e, "message", e))
        threading.Thread(target=check, name=f"check-{rel.vm}", daemon=True).start()

    def _cluster_busy(self) -> bool:
        return any(t.name == "cluster" and t.is_alive() for t in threading.enumerate())

    def _revive_targets(self) -> None:
        """Replica side: mirror targets whose storage daemon died (replica.mirror)."""
        if not any(not t.alive() for t in list(self.host.mirror_targets.values())):
            return
        t = self._running.get("revive-targets")
        if t is not None and t.is_alive():
            return
        from ..replica.mirror import revive_dead_targets

        def run():
            try:
                revive_dead_targets(self.host)
            except Exception:  # noqa: BLE001 — tried again next second
                log.exception("reviving mirror targets failed")
        t = threading.Thread(target=run, name="revive-targets", daemon=True)
        self._running["revive-targets"] = t
        t.start()

    def redo_unapplied(self) -> None:
        """Replica side: a VM whose staged cycle could not be applied (replica.unapplied)
        gets it applied as soon as that works, with nobody asking: taking the VM's lock
        does it (service.host.VMLock)."""
        for key in sorted(self.host.unapplied):
            name = f"redo-{key}"
            t = self._running.get(name)
            if t is not None and t.is_alive():
                continue

            def run(key=key):
                lock = self.host.vm_lock(key)
                try:
                    if lock.acquire(blocking=False):
                        lock.release()
                except Exception as e:  # noqa: BLE001 — still unapplied: the reason is kept
                    log.info("staged cycle of %s still not applied: %s", key,
                             getattr(e, "message", e))
            t = threading.Thread(target=run, name=name, daemon=True)
            self._running[name] = t
            t.start()

    def close_idle_heads(self) -> None:
        """Replica side: close the head servers that no cycle used for a while."""
        for vm in self.host.heads.idle_vms():
            lock = self.host.vm_lock(vm)
            if lock.acquire(blocking=False, whole=False):
                try:
                    if vm in self.host.heads.idle_vms():
                        self.host.heads.close(vm)
                finally:
                    lock.release()

    def _cycle(self, vm: str, slot: float) -> None:
        from ..primary.follow import cycle  # (an existing domain's configuration first)
        try:
            cycle(self.host, vm, slot=slot)
        except Exception as e:  # noqa: BLE001 — recorded in the store by run_cycle
            log.warning("scheduled cycle of %s failed: %s", vm, getattr(e, "message", e))
