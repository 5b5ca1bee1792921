"""Continuous mode, primary side: zero data loss with QEMU's own active mirror.

The relationship first catches up with bitmap cycles; then, with the VM paused for the
length of one small cycle, the last changes are shipped, the replica opens its heads as
NBD exports (TLS, writing through) and the VM's QEMU starts a `write-blocking` mirror of
every disk (`sync: none`: the replica already equals the disks) — from then on a guest
write is acknowledged only once the replica has it (`in_sync`).

A watchdog follows each mirror twice a second on the VM's second, out-of-band monitor:
- a job that stopped (the replica went away) means `degraded`: the guest keeps running,
  the job's own bitmap records what the replica misses, and the watchdog resumes the job
  until it is back in sync — only the changes move;
- a replica that stops answering without going away (a stopped process, a black hole)
  would block guest writes: a probe request through our own NBD connection to the
  replica's export must answer within a bound, else the mirror's NBD connections are
  yanked (out of band), the writes complete, the mode is `degraded`. The guest never
  waits longer than `--max-stall`;
- a job that cannot come back (yanked, or QEMU lost it) is dropped; the relationship's
  persistent bitmap, which recorded every write all along, drives catch-up cycles and
  a new mirror.

While in sync the tracking bitmap is rotated (two generations, only while the mirror is
healthy), so a catch-up after an outage ships about what changed during the outage.
Recovery points are taken on the replica, live, at each point interval.

This module is the watchdog itself: the scheduler's tick, the sub-state (``set_state``,
told to the replica), its verdicts on a mirror in sync, and ending a mirror on purpose
(``stop``). What it runs on a worker thread (starting a mirror, bringing one back,
rotating the bitmap, recovery points) is primary.mirror_steps; what it knows of each
mirror, and its probe of the replica's export, primary.mirror_probe.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from ..domain import points as dp
from ..domain.relationship import Relationship
from ..errors import VmreplicaError
from ..hypervisor.base import QUIET_CANCEL_GUARD
from .mirror_probe import MirrorWatch, probe_connect, unanswered_for
from .mirror_steps import (
    close_target,
    make_point,
    recover_mirror,
    rotate_bitmap,
    start_mirror,
    why,
)

log = logging.getLogger("vmreplica.continuous")

ROTATE_EVERY = 10.0           # seconds between bitmap rotations while in sync


class Continuous:
    """The watchdog of this host's continuous relationships (``host.continuous``)."""

    def __init__(self, host):
        self.host = host
        self.mirrors: dict[str, MirrorWatch] = {}
        self.ending: set[str] = set()   # VMs whose mirror is being ended on purpose
        self._tellers: dict[str, threading.Thread] = {}
        self._tell_after: dict[str, float] = {}

    # -- the scheduler calls this twice a second ---------------------------------------
    def tick(self, now: float) -> None:
        for rel in self.host.store.relationships():
            if rel.role == "primary" and told_is_stale(rel) and \
                    now >= self._tell_after.get(rel.vm, 0.0):
                self._tell(rel.vm)
            if rel.role != "primary" or rel.mode != "continuous" or \
                    rel.vm in self.ending:
                continue          # (a mirror being ended on purpose is not watched)
            m = self.mirrors.setdefault(rel.vm, MirrorWatch(rel.vm))
            if rel.state != "replicating" or rel.fenced or rel.preparing:
                self._stand_down(m, rel)
                continue
            if m.busy():
                # A worker (bitmap rotation, recovery point) may wait on QEMU, which waits
                # on a replica that hangs (a bitmap change drains the disk's I/O): the
                # guard against the hang must not wait for the worker.
                if rel.sync_state == "in_sync":
                    try:
                        self._guard(m, rel, now)
                    except Exception as e:  # noqa: BLE001 — as below
                        log.warning("continuous mode of %s: %s", rel.vm,
                                    getattr(e, "message", e))
                continue
            try:
                self._step(m, rel, now)
            except Exception as e:  # noqa: BLE001 — one VM's trouble must not stop the others
                log.warning("continuous mode of %s: %s", rel.vm, why(e))

    def set_state(self, vm: str, state: str, reason: str | None = None) -> None:
        rel = self.host.store.relationship(vm)
        if rel is None or rel.sync_state == state or vm in self.ending \
                or rel.mode != "continuous":
            return      # (a watchdog step that saw the mirror end on purpose says nothing)
        self.host.store.update_relationship(vm, sync_state=state, sync_reason=reason,
                                            sync_since=time.time())
        self.host.event("continuous", f"{state}" + (f": {reason}" if reason else ""), vm)
        self._tell(vm)

    # -- the replica shows what this side knows: mode and sub-state ------------------------
    def _tell(self, vm: str) -> None:
        """Tell the replica the mode and the sub-state, on a thread of its own (a replica
        that hangs must not hold the watchdog); the tick tries again until it is told."""
        t = self._tellers.get(vm)
        if t is not None and t.is_alive():
            return
        self._tell_after[vm] = time.time() + 5      # the next try, if this one fails
        t = threading.Thread(target=tell_replica, args=(self.host, vm),
                             name=f"tell-{vm}", daemon=True)
        self._tellers[vm] = t
        t.start()

    def last_write(self, vm: str) -> float | None:
        """When the mirror last carried a guest write to the replica (seen by the
        watchdog: the jobs' progress moved), or when it came in sync."""
        m = self.mirrors.get(vm)
        return m.last_write_at if m is not None else None

    def _spawn(self, m: MirrorWatch, fn, *args) -> None:
        m.worker = threading.Thread(target=fn, args=args, name=f"mirror-{m.vm}", daemon=True)
        m.worker.start()

    def _step(self, m: MirrorWatch, rel: Relationship, now: float) -> None:
        vm = rel.vm
        running = self.host.driver.inspect(vm).state == "running"
        state = rel.sync_state
        if not running:
            # Nothing writes: periodic cycles (the scheduler) keep the replica current.
            m.close()
            if state != "idle":
                try:        # what the mirror left (the libvirt driver's relay)
                    self.host.driver.mirror_stop(vm, rel.disks)
                except Exception as e:  # noqa: BLE001
                    log.warning("ending the mirror of %s: %s", vm, getattr(e, "message", e))
            self.set_state(vm, "idle", "the VM is not running")
            return
        if state in (None, "idle", "catching_up"):
            if now >= m.next_attempt:
                self._spawn(m, start_mirror, self, vm)
            return
        if state == "in_sync":
            self._watch(m, rel, now)
        elif state == "degraded" and now >= m.next_attempt:
            self._spawn(m, recover_mirror, self, vm)

    # -- watching ------------------------------------------------------------------------
    def _watch(self, m: MirrorWatch, rel: Relationship, now: float) -> None:
        vm = rel.vm
        # The probe first: it never waits, while asking QEMU for its jobs waits for a
        # main loop that a hung replica may hold (a drain).
        if m.probe is None and m.probe_pending is None and rel.mirror_target:
            try:
                probe_connect(m, self.host, vm, rel.mirror_creds or "", rel.mirror_target,
                              rel.disks[0])
            except Exception:  # noqa: BLE001
                m.healthy_since = 0.0
                self.set_state(vm, "degraded", f"cannot reach the replica {rel.peer}'s export")
                m.next_attempt = now + 1
                return
        if self._guard(m, rel, now):
            return
        if m.mon is None:
            m.mon = self.host.driver.watch_monitor(vm)
        jobs = self.host.driver.mirror_status(vm, mon=m.mon)
        bad = [d for d in rel.disks if d not in jobs or jobs[d].get("io-status") != "ok"
               or jobs[d].get("paused") or jobs[d].get("status") not in ("ready", "running")]
        if bad:
            m.healthy_since = 0.0
            self.set_state(vm, "degraded", f"the mirror of {', '.join(bad)} stopped "
                                           f"(the replica {rel.peer} does not take writes)")
            m.next_attempt = now + 1
            return
        moved = sum(int(jobs[d].get("offset") or 0) for d in rel.disks)
        if m.last_write_at is None:       # (a restarted daemon: since it came in sync)
            m.last_write_at = rel.sync_since or time.time()
        elif m.job_bytes is not None and moved != m.job_bytes:
            m.last_write_at = time.time()
        m.job_bytes = moved
        mono = time.monotonic()
        if mono - m.last_rotation >= ROTATE_EVERY and m.healthy_since and \
                mono - m.healthy_since >= ROTATE_EVERY:
            self._spawn(m, rotate_bitmap, self, vm)
        elif dp.point_due(rel.last_point_at, rel.point_interval, now,
                          rel.history):
            self._spawn(m, make_point, self.host, vm)

    def _guard(self, m: MirrorWatch, rel: Relationship, now: float) -> bool:
        """The probe's verdict: a replica that stopped answering is cut (True), one whose
        export went away makes the mode degraded (True); False if all is well."""
        vm = rel.vm
        hung = unanswered_for(m, rel.max_stall)
        if hung < 0:
            m.healthy_since = 0.0
            self.set_state(vm, "degraded", f"lost the connection to the replica {rel.peer}'s "
                                           "export")
            m.next_attempt = now + 1
            return True
        if hung:
            # (qemu: a yanked job cannot be resumed; libvirt: it can, through a new relay)
            m.yanked = not self.host.driver.mirror_yank(m.mon, rel.disks)
            m.healthy_since = 0.0
            self.set_state(vm, "degraded", f"the replica {rel.peer} stopped answering for "
                                           f"{hung:.1f} s: mirror connection cut so the guest "
                                           "does not wait")
            m.next_attempt = now + 1
            return True
        return False

    # -- stopping --------------------------------------------------------------------------
    def _stand_down(self, m: MirrorWatch, rel: Relationship) -> None:
        if m.mon is not None or m.probe is not None:
            m.close()

    def stop(self, vm: str) -> None:
        """Back to periodic: end the mirror (the bitmap carries on), close the target."""
        host = self.host
        self.ending.add(vm)
        try:
            rel = host.store.relationship(vm)
            m = self.mirrors.pop(vm, None)
            if m is not None:
                if m.worker is not None:
                    m.worker.join(QUIET_CANCEL_GUARD)
                    if m.worker.is_alive():
                        # A worker held by a replica that hangs (a bitmap change drains
                        # the disk's I/O, a recovery point waits on the replica): the
                        # watchdog no longer guards this VM, so cut the mirror here — the
                        # guest's waiting writes complete, the bitmap has them.
                        self._cut(m, vm, rel)
                        m.worker.join(60)
                m.close()
            try:
                host.driver.mirror_stop(vm, rel.disks)
            except Exception as e:  # noqa: BLE001
                log.warning("stopping the mirror of %s: %s", vm, e)
            close_target(host, rel)
            host.store.update_relationship(vm, sync_state=None, sync_reason=None)
        finally:
            self.ending.discard(vm)

    def _cut(self, m: MirrorWatch, vm: str, rel: Relationship) -> None:
        mon = m.mon
        try:
            if mon is None:
                mon = self.host.driver.watch_monitor(vm)
            self.host.driver.mirror_yank(mon, rel.disks)
            log.warning("ending the mirror of %s: a worker waited %.0f s on the replica; "
                        "the mirror was cut", vm, QUIET_CANCEL_GUARD)
        except Exception as e:  # noqa: BLE001 — the paused cancel has its own guard
            log.warning("cutting the mirror of %s: %s", vm, getattr(e, "message", e))
        finally:
            if mon is not None and mon is not m.mon:
                mon.close()

    def status(self, vm: str) -> str | None:
        rel = self.host.store.relationship(vm)
        return rel.sync_state if rel else None


def told_is_stale(rel: Relationship) -> bool:
    """Whether the replica has not been told this side's mode and sub-state yet (a
    relationship made before there was anything to tell counts as told while periodic)."""
    told = rel.peer_told
    if told is None:
        return rel.mode == "continuous" or rel.sync_state is not None
    return told != {"mode": rel.mode, "sync_state": rel.sync_state}


def tell_replica(host, vm: str) -> bool:
    """Send the relationship's mode and continuous sub-state to the replica (its status
    then shows the same MODE); True once the replica has the current ones."""
    for _ in range(3):                     # the state may change while it is being told
        rel = host.store.relationship(vm)
        if rel is None or rel.role != "primary":
            return False
        told = {"mode": rel.mode, "sync_state": rel.sync_state}
        try:
            host.client_for_peer(rel.peer, timeout=10).request(
                "POST", f"/v1/replica/relationships/{vm}/settings",
                dict(told, sync_reason=rel.sync_reason,
                     sync_since=rel.sync_since, max_stall=rel.max_stall))
        except VmreplicaError as e:
            log.info("telling the replica of %s its mode: %s", vm, getattr(e, "message", e))
            return False
        now = host.store.relationship(vm)
        if now is None:
            return False
        host.store.update_relationship(vm, peer_told=told)
        if not told_is_stale(dataclasses.replace(now, peer_told=told)):
            return True
    return False

