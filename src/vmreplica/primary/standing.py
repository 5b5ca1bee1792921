"""This host's standing as the primary of a relationship, as its replica sees it: asked
(``check_peer``), it may be superseded — another host has taken over: this copy is fenced
(powered off; `vm start` refuses it) or, for a DR link, stands by — or the replica may
have removed the relationship: this side ends too (``end_removed``)."""

from __future__ import annotations

import logging

from ..domain.links import is_dr, vm_name
from ..domain.relationship import Relationship
from ..domain.states import State
from ..errors import NotFound, OperationError, Removed, Superseded

log = logging.getLogger("vmreplica.primary")


def check_peer(host, vm: str, timeout: float = 10.0) -> dict:
    """Ask the replica whether this host is still the primary of ``vm``. A replica that
    has taken over answers `superseded`: this host fences its copy (powers it off; `vm
    start` refuses it) — the "two copies on one network" case after an unplanned failover.
    Raises Superseded then; Unreachable if the replica cannot be asked."""
    rel = host.store.relationship(vm)
    try:
        return host.client_for_peer(rel.peer, timeout=timeout).request(
            "GET", f"/v1/replica/relationships/{vm_name(vm)}/state?epoch={rel.epoch}")
    except Removed:
        end_removed_later(host, vm, rel.id, rel.peer)
        raise
    except Superseded as e:
        if is_dr(vm):
            if rel.state != State.STANDBY.value:
                host.store.set_state(vm, State.STANDBY.value, last_error=e.message)
                host.event("dr", f"the DR link was taken over by another host: standing by "
                                 f"({e.message})", vm)
        elif not rel.fenced:
            with host.vm_lock(vm):
                host.store.set_state(vm, State.ERROR.value, last_error=e.message,
                    fenced=f"{rel.peer} has become the primary ({e.message})")
                fence(host, vm)
        raise


def fence(host, vm: str) -> None:
    """This host learnt it is a stale primary: its copy of the VM must not run (two
    copies on one network). Power it off at once; `vm start` refuses it from now on."""
    try:
        if host.driver.inspect(vm).state == "running":
            host.driver.stop(vm, force=True)
    except Exception:  # noqa: BLE001 — keep the fence in the store regardless
        log.exception("could not stop the fenced VM %s", vm)
    host.event("fence", "this host is no longer the primary: the VM was powered off and "
                        "fenced", vm)
    log.warning("%s fenced: another host is its primary now", vm)


def end_removed(host, vm: str, rel_id: str, by: str, tell: bool = False) -> bool:
    """End this side of relationship ``rel_id`` of ``vm``, which its replica ``by``
    removed: as `remove` (mirror stopped, bitmaps dropped, rows deleted), with an event.
    ``tell``: then say so to the replica, which drops its tombstone. False if that
    relationship is no longer here."""
    rel = host.store.relationship(vm)
    if rel is None or rel.id != rel_id:
        return False
    if rel.mode == "continuous":
        host.continuous.stop(vm)
    with host.vm_lock(vm):
        rel = host.store.relationship(vm)
        if rel is None or rel.id != rel_id:
            return False
        end_here(host, vm, rel)
    host.event("relationship", f"replication removed by its replica {by}", vm)
    if tell:          # (only its tombstone goes: whatever else it holds now stays)
        try:
            host.client_for_peer(by, timeout=30).request(
                "DELETE", f"/v1/replica/relationships/{vm_name(vm)}?ended=1")
        except OperationError as e:   # the tombstone stays there: harmless, and a new
            host.event("relationship", f"{by} was not told that this side ended too: "
                                       f"{e.message}", vm)   # relationship drops it
    return True


def end_removed_later(host, vm: str, rel_id: str, by: str) -> None:
    """``end_removed`` on a thread of its own: the caller (a cycle, a state check) may
    hold the VM's lock or be the continuous mode's worker, and goes on with its error."""
    import threading

    def run():
        try:
            end_removed(host, vm, rel_id, by, tell=True)
        except Exception:  # noqa: BLE001 — the next call is refused again and retries it
            log.exception("ending the relationship of %s its replica removed", vm)
    threading.Thread(target=run, name=f"removed-{vm}", daemon=True).start()


def end_here(host, vm: str, rel: Relationship) -> None:
    """This host's side of a relationship ends (under the VM's lock, the continuous
    mirror already stopped): every tracking bitmap it made dropped, its rows deleted."""
    try:
        _drop_bitmaps(host, rel)
    except OperationError as e:
        if rel.state != State.STANDBY.value:
            raise
        # The VM is a replica here now: its disks belong to the replication into them.
        host.event("relationship", f"the DR link's tracking bitmaps stay on the disks "
                                   f"(they are in use: {e.message})", vm)
    host.store.remove_relationship(vm)


def _drop_bitmaps(host, rel: Relationship) -> None:
    """Remove every bitmap this relationship made on the VM's disks (invariant 6)."""
    from ..tracking.bitmap import bitmap_prefix
    name = vm_name(rel.vm)
    try:
        host.driver.inspect(name)
    except NotFound:
        return
    tracker = host.tracker(rel.tracker)
    disks = [d.name for d in host.driver.inspect(name).disks]   # excluded ones too
    with host.driver.block_session(name) as session:
        names = tracker.owned(session, disks, bitmap_prefix(rel.id))
        if names:
            session.release(disks, sorted(names))
