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
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from ..domain import points as dp
from ..domain.relationship import Relationship
from ..domain.units import format_size
from ..errors import OperationError, Superseded, VmreplicaError
from ..hypervisor.base import QUIET_CANCEL_GUARD
from ..tracking.bitmap import bitmap_prefix

log = logging.getLogger("vmreplica.continuous")

CATCH_UP_BYTES = 64 << 20     # a cycle below this: stop catching up, start the mirror
ROTATE_EVERY = 10.0           # seconds between bitmap rotations while in sync
RESUME_TRIES = 20             # degraded: resume attempts before starting afresh
PROBE_EVERY = 0.5
_PROBE_LOCK = threading.Lock()   # a probe connection handed from its thread to the watchdog


class _Mirror:
    """What the watchdog knows of one VM's mirror (in memory; the sub-state is in the store)."""

    def __init__(self, vm: str):
        self.vm = vm
        self.mon = None               # the VM's out-of-band monitor
        self.probe: Any = None        # libnbd handle on the replica's export
        self.probe_cookie = None
        self.probe_pending: dict | None = None   # a connection being made (see _probe_connect)
        self.probe_sent = 0.0
        self.last_probe = 0.0
        self.worker: threading.Thread | None = None
        self.last_rotation = 0.0
        self.healthy_since = 0.0
        self.resume_tries = 0
        self.yanked = False
        self.next_attempt = 0.0
        self.offsets: dict[str, int] = {}
        self.job_bytes: int | None = None     # the mirror jobs' progress, last seen
        self.last_write_at: float | None = None   # when that progress last moved

    def busy(self) -> bool:
        return self.worker is not None and self.worker.is_alive()

    def close(self) -> None:
        from ..qemutools import nbdio
        if self.probe is not None:
            nbdio.close(self.probe)
            self.probe = None
        self.probe_cookie = None
        self.probe_pending = None
        if self.mon is not None:
            self.mon.close()
            self.mon = None


class Continuous:
    def __init__(self, host):
        self.host = host
        self.mirrors: dict[str, _Mirror] = {}
        self._stopping: set[str] = set()   # VMs whose mirror is being ended on purpose
        self._tellers: dict[str, threading.Thread] = {}
        self._tell_after: dict[str, float] = {}

    # -- the scheduler calls this twice a second ---------------------------------------
    def tick(self, now: float) -> None:
        for rel in self.host.store.relationships():
            if rel.role == "primary" and told_is_stale(rel) and \
                    now >= self._tell_after.get(rel.vm, 0.0):
                self._tell(rel.vm)
            if rel.role != "primary" or rel.mode != "continuous" or \
                    rel.vm in self._stopping:
                continue          # (a mirror being ended on purpose is not watched)
            m = self.mirrors.setdefault(rel.vm, _Mirror(rel.vm))
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
                log.warning("continuous mode of %s: %s", rel.vm, _why(e))

    def _set(self, vm: str, state: str, reason: str | None = None) -> None:
        rel = self.host.store.relationship(vm)
        if rel is None or rel.sync_state == state or vm in self._stopping \
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

    def _spawn(self, m: _Mirror, fn, *args) -> None:
        m.worker = threading.Thread(target=fn, args=args, name=f"mirror-{m.vm}", daemon=True)
        m.worker.start()

    def _step(self, m: _Mirror, rel: Relationship, now: float) -> None:
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
            self._set(vm, "idle", "the VM is not running")
            return
        if state in (None, "idle", "catching_up"):
            if now >= m.next_attempt:
                self._spawn(m, self._start, vm)
            return
        if state == "in_sync":
            self._watch(m, rel, now)
        elif state == "degraded" and now >= m.next_attempt:
            self._spawn(m, self._recover, vm)

    # -- starting a mirror ---------------------------------------------------------------
    def _start(self, vm: str) -> None:
        from .cycle import run_cycle
        host = self.host
        m = self.mirrors.get(vm)
        if m is None or vm in self._stopping:
            return            # ended meanwhile
        m.close()
        self._set(vm, "catching_up")
        try:
            rel = host.store.relationship(vm)
            host.driver.mirror_stop(vm, rel.disks)
            _close_target(host, rel)
            for _ in range(5):                        # catch up with bitmap cycles
                stats = run_cycle(host, vm)
                if stats["raw_bytes"] + stats["zero_bytes"] < CATCH_UP_BYTES:
                    break
            with host.vm_lock(vm):
                host.driver.pause(vm)                 # the hand-over: one small cycle long
                try:
                    run_cycle(host, vm)
                    rel = host.store.relationship(vm)
                    target = host.client_for_peer(rel.peer, timeout=60).request(
                        "POST", f"/v1/replica/relationships/{vm}/mirror", {"action": "open"})
                    from ..transport.tls import creds_dir
                    creds = creds_dir(host, host.store.peer(rel.peer), "client",
                                      f"mc-{rel.id[:8]}")
                    host.driver.mirror_start(vm, rel.disks, {
                        "host": target["host"], "port": target["port"], "tls_dir": creds,
                        "tls_hostname": target["tls_hostname"]})
                finally:
                    host.driver.resume(vm)
            m.mon = host.driver.watch_monitor(vm)
            _probe_connect(m, host, vm, str(creds), target, rel.disks[0])
            m.last_rotation = m.healthy_since = time.monotonic()
            m.resume_tries, m.yanked = 0, False
            m.job_bytes, m.last_write_at = None, time.time()   # the hand-over synced all
            host.store.update_relationship(vm, mirror_target=target, mirror_creds=str(creds))
            self._set(vm, "in_sync")
        except Superseded:
            m.close()
        except Exception as e:  # noqa: BLE001 — retried; the bitmap keeps every change
            m.close()
            m.next_attempt = time.time() + 5
            self._set(vm, "degraded", f"could not start the mirror: "
                                      f"{getattr(e, 'message', None) or e}")

    # -- watching ------------------------------------------------------------------------
    def _watch(self, m: _Mirror, rel: Relationship, now: float) -> None:
        vm = rel.vm
        # The probe first: it never waits, while asking QEMU for its jobs waits for a
        # main loop that a hung replica may hold (a drain).
        if m.probe is None and m.probe_pending is None and rel.mirror_target:
            try:
                _probe_connect(m, self.host, vm, rel.mirror_creds or "", rel.mirror_target,
                               rel.disks[0])
            except Exception:  # noqa: BLE001
                m.healthy_since = 0.0
                self._set(vm, "degraded", f"cannot reach the replica {rel.peer}'s export")
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
            self._set(vm, "degraded", f"the mirror of {', '.join(bad)} stopped "
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
            self._spawn(m, self._rotate, vm)
        elif dp.point_due(rel.last_point_at, rel.point_interval, now,
                          rel.history):
            self._spawn(m, self._point, vm)

    def _guard(self, m: _Mirror, rel: Relationship, now: float) -> bool:
        """The probe's verdict: a replica that stopped answering is cut (True), one whose
        export went away makes the mode degraded (True); False if all is well."""
        vm = rel.vm
        hung = self._probe(m, rel, rel.max_stall)
        if hung < 0:
            m.healthy_since = 0.0
            self._set(vm, "degraded", f"lost the connection to the replica {rel.peer}'s "
                                      "export")
            m.next_attempt = now + 1
            return True
        if hung:
            # (qemu: a yanked job cannot be resumed; libvirt: it can, through a new relay)
            m.yanked = not self.host.driver.mirror_yank(m.mon, rel.disks)
            m.healthy_since = 0.0
            self._set(vm, "degraded", f"the replica {rel.peer} stopped answering for "
                                      f"{hung:.1f} s: mirror connection cut so the guest "
                                      "does not wait")
            m.next_attempt = now + 1
            return True
        return False

    def _probe(self, m: _Mirror, rel: Relationship, stall: float) -> float:
        """Seconds the replica has left a probe unanswered once that is past the bound
        (a fraction of --max-stall, so the yank comes in time), 0 if all is well, -1 if
        the connection to its export broke (the replica went away)."""
        now = time.monotonic()
        if m.probe is None:
            pending = m.probe_pending
            if pending is None:
                return 0.0
            # The connection itself is the first probe: a replica (or relay) that hangs
            # may accept it and never finish the handshake.
            with _PROBE_LOCK:
                h = pending.get("h")
                if h is not None:
                    m.probe, m.probe_cookie, m.probe_pending = h, None, None
                    m.last_probe = 0.0
            if h is None:
                if "e" in pending:
                    m.probe_pending = None
                    return -1.0
                waited = now - pending["since"]
                return waited if waited > stall * 0.6 else 0.0
        try:
            assert m.probe is not None          # (connected above, or returned)
            m.probe.poll(0)
            if m.probe_cookie is not None and m.probe.aio_command_completed(m.probe_cookie):
                m.probe_cookie = None
                if not m.healthy_since:
                    m.healthy_since = now
        except Exception:  # noqa: BLE001 — the export went away
            from ..qemutools import nbdio
            nbdio.close(m.probe)
            m.probe, m.probe_cookie = None, None
            return -1.0
        if m.probe_cookie is not None:
            waited = now - m.probe_sent
            return waited if waited > stall * 0.6 else 0.0
        if now - m.last_probe >= PROBE_EVERY:
            m.probe_cookie = m.probe.aio_pread(bytearray(512), 0)
            m.probe_sent = m.last_probe = now
        return 0.0

    # -- while in sync: rotate the tracking bitmap, make recovery points -------------------
    def _rotate(self, vm: str) -> None:
        host = self.host
        m = self.mirrors.get(vm)
        if m is None:
            return
        lock = host.vm_lock(vm)
        if not lock.acquire(timeout=2):
            return
        try:
            rel = host.store.relationship(vm)
            cycle = rel.cycle + 1
            new = f"{bitmap_prefix(rel.id)}{cycle}"
            with host.driver.block_session(vm) as session:
                session.add_bitmap(rel.disks, new)
                older = rel.bitmap
                keep = rel.bitmap_next or older
                # The oldest generation goes only after a whole healthy period: any write
                # it recorded has reached the replica (or its failure was seen).
                if older and keep != older:
                    session.release(rel.disks, [older])
            host.store.update_relationship(vm, cycle=cycle, bitmap=keep, bitmap_next=new,
                                           last_success_at=time.time())
            m.last_rotation = time.monotonic()
        except Exception as e:  # noqa: BLE001 — the next rotation tries again
            log.warning("bitmap rotation of %s: %s", vm, getattr(e, "message", e))
        finally:
            lock.release()

    def _point(self, vm: str) -> None:
        from .cycle import freeze_guest, thaw_guest
        host = self.host
        rel = host.store.relationship(vm)
        kind = dp.kind_for(rel.points_made, rel.app_every)
        thaw = kind == dp.APP and freeze_guest(host, vm, True)
        if kind == dp.APP and not thaw:
            kind = dp.CRASH
        t = time.time()
        try:
            host.client_for_peer(rel.peer, timeout=120).request(
                "POST", f"/v1/replica/relationships/{vm}/point",
                {"kind": kind, "time": t, "epoch": rel.epoch})
            host.store.update_relationship(vm, last_point_at=t, last_success_at=t,
                                           points_made=rel.points_made + 1)
        except OperationError as e:
            log.warning("recovery point of %s: %s", vm, e.message)
            host.store.update_relationship(vm, last_point_at=t)   # next interval
        finally:
            if thaw:
                thaw_guest(host, vm)

    # -- degraded → in sync ----------------------------------------------------------------
    def _recover(self, vm: str) -> None:
        m = self.mirrors.get(vm)
        rel = self.host.store.relationship(vm)
        if m is None or vm in self._stopping or rel is None or \
                rel.mode != "continuous" or rel.state != "replicating":
            return            # ended meanwhile (back to periodic, removed, failed over)
        try:
            self._try_recover(m, vm)
        except Exception as e:  # noqa: BLE001 — the next attempt starts afresh
            log.warning("bringing the mirror of %s back: %s", vm, _why(e))
            m.yanked = True
            m.next_attempt = time.time() + 2

    def _try_recover(self, m: _Mirror, vm: str) -> None:
        host = self.host
        rel = host.store.relationship(vm)
        try:
            jobs = host.driver.mirror_status(vm)
        except Exception:  # noqa: BLE001
            jobs = {}
        if m.yanked or not all(d in jobs for d in rel.disks) or \
                m.resume_tries >= RESUME_TRIES:
            # The jobs cannot come back: start afresh from the tracking bitmap (the
            # watchdog's monitor closed first: ending the jobs may need it, see
            # hypervisor/base.py QUIET_CANCEL).
            m.close()
            try:
                host.driver.mirror_stop(vm, rel.disks)
            except Exception:  # noqa: BLE001
                pass
            self._start(vm)
            return
        if m.resume_tries == 0:
            m.offsets = {d: int(jobs[d].get("offset", 0)) for d in rel.disks}
        m.resume_tries += 1
        # (the target as recorded: a daemon that restarted knows it from the store)
        host.driver.mirror_resume(vm, rel.disks, dict(rel.mirror_target or {},
                                                         tls_dir=rel.mirror_creds))
        time.sleep(0.5)
        jobs = host.driver.mirror_status(vm)
        gone = [d for d in rel.disks if d not in jobs]
        if gone:
            # A job that ended while being resumed cannot come back: the next attempt
            # starts afresh from the tracking bitmap.
            m.yanked = True
            m.next_attempt = time.time() + 1
            log.warning("bringing the mirror of %s back: the mirror job of %s ended while "
                        "it was resumed; starting a new mirror", vm, ", ".join(gone))
            return
        if all(jobs[d].get("io-status") == "ok" and not jobs[d].get("paused") and
               jobs[d].get("offset") == jobs[d].get("len") for d in rel.disks):
            moved = sum(int(jobs[d]["offset"]) - m.offsets.get(d, 0) for d in rel.disks)
            m.resume_tries = 0
            if m.probe is not None:       # a fresh probe (libvirt: through the new relay)
                from ..qemutools import nbdio
                nbdio.close(m.probe)
            m.probe, m.probe_cookie, m.probe_pending = None, None, None
            m.healthy_since = time.monotonic()
            m.job_bytes, m.last_write_at = None, time.time()   # caught up: the replica has all
            host.store.update_relationship(vm, last_catch_up_bytes=moved)
            self._set(vm, "in_sync", f"the replica is back; {format_size(moved)} that "
                                     "changed meanwhile were copied")
        else:
            m.next_attempt = time.time() + 1

    # -- stopping --------------------------------------------------------------------------
    def _stand_down(self, m: _Mirror, rel: Relationship) -> None:
        if m.mon is not None or m.probe is not None:
            m.close()

    def stop(self, vm: str) -> None:
        """Back to periodic: end the mirror (the bitmap carries on), close the target."""
        host = self.host
        self._stopping.add(vm)
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
            _close_target(host, rel)
            host.store.update_relationship(vm, sync_state=None, sync_reason=None)
        finally:
            self._stopping.discard(vm)

    def _cut(self, m: _Mirror, vm: str, rel: Relationship) -> None:
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


def _why(e: BaseException) -> str:
    """A reason worth logging: our own errors' message, else the kind of error too (a
    bare KeyError says only 'disk0')."""
    return getattr(e, "message", None) or f"{type(e).__name__}: {e}"


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


def _close_target(host, rel: Relationship) -> None:
    """Best effort: a replica that is gone or no longer holds the VM has nothing open."""
    try:
        host.client_for_peer(rel.peer, timeout=30).request(
            "POST", f"/v1/replica/relationships/{rel.vm}/mirror", {"action": "close"})
    except VmreplicaError:
        pass


def _probe_connect(m: _Mirror, host, vm: str, creds: str, target: dict, export: str) -> None:
    """Open our own NBD connection along the mirror's path on a short-lived thread (a
    replica that hangs may accept a connection and never finish the handshake; the
    watchdog must not wait for it: ``_probe`` times the attempt like a probe read):
    through the driver's relay when it has one (libvirt: so a relay that hangs is caught
    too), else straight to the replica's export over TLS."""
    relay = host.driver.mirror_relay_socket(vm)
    pending: dict = {"since": time.monotonic()}

    def connect():
        import nbd

        from ..qemutools import nbdio
        try:
            h = nbd.NBD()
            h.set_export_name(export)
            if relay:
                h.connect_unix(relay)
            else:
                h.set_tls(nbd.TLS_REQUIRE)
                h.set_tls_certificates(str(creds))
                h.set_tls_verify_peer(True)
                h.connect_tcp(target["host"], str(target["port"]))
        except Exception as e:  # noqa: BLE001 — reported by _probe
            pending["e"] = e
            return
        with _PROBE_LOCK:
            if m.probe_pending is pending:
                pending["h"] = h
                return
        nbdio.close(h)                          # given up on meanwhile

    m.probe, m.probe_cookie, m.probe_pending = None, None, pending
    threading.Thread(target=connect, name=f"probe-{vm}", daemon=True).start()
