"""Continuous mode, primary side: the steps the watchdog (primary.continuous) runs on a
worker thread of the VM's mirror.

- ``start_mirror``: catch up with bitmap cycles, then the hand-over — the VM paused for
  one small cycle, the replica's mirror target opened, QEMU's write-blocking mirror
  started — and `in_sync`;
- ``recover_mirror``: `degraded` back to `in_sync` by resuming the mirror jobs (only the
  changes move), or, when they cannot come back, a fresh start from the tracking bitmap;
- ``rotate_bitmap`` and ``make_point``: while in sync, a new generation of the tracking
  bitmap, and a recovery point taken live on the replica.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from ..domain import points as dp
from ..domain.relationship import Relationship
from ..domain.units import format_size
from ..errors import OperationError, Superseded, VmreplicaError
from ..tracking.bitmap import bitmap_prefix
from .mirror_probe import MirrorWatch, probe_connect

log = logging.getLogger("vmreplica.continuous")

CATCH_UP_BYTES = 64 << 20     # a cycle below this: stop catching up, start the mirror
RESUME_TRIES = 20             # degraded: resume attempts before starting afresh


class Supervisor(Protocol):
    """What the steps use of the watchdog (primary.continuous.Continuous)."""

    host: Any
    mirrors: dict[str, MirrorWatch]
    ending: set[str]          # VMs whose mirror is being ended on purpose

    def set_state(self, vm: str, state: str, reason: str | None = None) -> None: ...


def why(e: BaseException) -> str:
    """A reason worth logging: our own errors' message, else the kind of error too (a
    bare KeyError says only 'disk0')."""
    return getattr(e, "message", None) or f"{type(e).__name__}: {e}"


def close_target(host, rel: Relationship) -> None:
    """Best effort: a replica that is gone or no longer holds the VM has nothing open."""
    try:
        host.client_for_peer(rel.peer, timeout=30).request(
            "POST", f"/v1/replica/relationships/{rel.vm}/mirror", {"action": "close"})
    except VmreplicaError:
        pass


# -- starting a mirror -----------------------------------------------------------------
def start_mirror(sup: Supervisor, vm: str) -> None:
    from .cycle import run_cycle
    host = sup.host
    m = sup.mirrors.get(vm)
    if m is None or vm in sup.ending:
        return            # ended meanwhile
    m.close()
    sup.set_state(vm, "catching_up")
    try:
        rel = host.store.relationship(vm)
        host.driver.mirror_stop(vm, rel.disks)
        close_target(host, rel)
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
        probe_connect(m, host, vm, str(creds), target, rel.disks[0])
        m.last_rotation = m.healthy_since = time.monotonic()
        m.resume_tries, m.yanked = 0, False
        m.job_bytes, m.last_write_at = None, time.time()   # the hand-over synced all
        host.store.update_relationship(vm, mirror_target=target, mirror_creds=str(creds))
        sup.set_state(vm, "in_sync")
    except Superseded:
        m.close()
    except Exception as e:  # noqa: BLE001 — retried; the bitmap keeps every change
        m.close()
        m.next_attempt = time.time() + 5
        sup.set_state(vm, "degraded", f"could not start the mirror: "
                                      f"{getattr(e, 'message', None) or e}")


# -- while in sync: rotate the tracking bitmap, make recovery points ----------------------
def rotate_bitmap(sup: Supervisor, vm: str) -> None:
    host = sup.host
    m = sup.mirrors.get(vm)
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


def make_point(host, vm: str) -> None:
    from .cycle import freeze_guest, thaw_guest
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
def recover_mirror(sup: Supervisor, vm: str) -> None:
    m = sup.mirrors.get(vm)
    rel = sup.host.store.relationship(vm)
    if m is None or vm in sup.ending or rel is None or \
            rel.mode != "continuous" or rel.state != "replicating":
        return            # ended meanwhile (back to periodic, removed, failed over)
    try:
        _try_recover(sup, m, vm)
    except Exception as e:  # noqa: BLE001 — the next attempt starts afresh
        log.warning("bringing the mirror of %s back: %s", vm, why(e))
        m.yanked = True
        m.next_attempt = time.time() + 2


def _try_recover(sup: Supervisor, m: MirrorWatch, vm: str) -> None:
    host = sup.host
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
        start_mirror(sup, vm)
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
        sup.set_state(vm, "in_sync", f"the replica is back; {format_size(moved)} that "
                                     "changed meanwhile were copied")
    else:
        m.next_attempt = time.time() + 1
