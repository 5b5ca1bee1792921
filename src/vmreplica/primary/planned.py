"""Planned failover on the primary: `failover VM --prepare [--shutdown]` and its cancel.

The VM must be off (or is shut down cleanly first); a final cycle ships every write it
made, marked final, so the replica knows it may fail over with zero loss. Until the
replica fails over, the VM here cannot be started (`failover VM --cancel` undoes it).
"""

from __future__ import annotations

from ..domain.relationship import Relationship
from ..domain.states import State
from ..errors import Conflict
from .common import relationship_of
from .cycle import run_cycle


def prepare(host, vm: str, shutdown: bool = False) -> dict:
    rel = relationship_of(host, vm)
    if rel.state == State.PREPARED_FOR_FAILOVER.value:
        raise Conflict(f"{vm} is already prepared for failover",
                       hint=f"next, on {rel.peer}: `vmreplica failover {vm}`")
    if rel.state != State.REPLICATING.value:
        raise Conflict(f"{vm} cannot be prepared for failover in state {rel.state}",
                       hint="it must be replicating (initial copy done, not suspended)")
    info = host.driver.inspect(vm)
    if info.state == "running" and not shutdown:
        raise Conflict(f"{vm} is running: a planned failover needs it off",
                       hint=f"shut it down first, or add --shutdown "
                            f"(`vmreplica failover {vm} --prepare --shutdown`)")
    if rel.mode == "continuous":
        marker = _continuous_shutdown(host, vm, rel, info.state == "running")
        if marker:
            host.client_for_peer(rel.peer, timeout=60).request(
                "POST", f"/v1/replica/relationships/{vm}/final", {"epoch": rel.epoch})
            host.store.set_state(vm, State.PREPARED_FOR_FAILOVER.value,
                                           preparing=False)
            host.event("failover", "prepared for planned failover: the mirror was in sync to "
                                   "the end, no final cycle needed", vm)
            return {"vm": vm, "state": State.PREPARED_FOR_FAILOVER.value, "final_cycle": None,
                    "raw_bytes": 0, "next": f"on {rel.peer}: vmreplica failover {vm}"}
    elif info.state == "running":
        host.event("failover", "shutting the VM down for a planned failover", vm)
        host.driver.stop(vm, force=False)
    try:
        stats = run_cycle(host, vm, final=True)
    finally:
        host.store.update_relationship(vm, preparing=False)
    host.store.set_state(vm, State.PREPARED_FOR_FAILOVER.value)
    host.event("failover", f"prepared for planned failover: final cycle {stats['cycle']} "
                           f"acknowledged by {rel.peer}", vm)
    return {"vm": vm, "state": State.PREPARED_FOR_FAILOVER.value, "final_cycle": stats["cycle"],
            "raw_bytes": stats["raw_bytes"],
            "next": f"on {rel.peer}: vmreplica failover {vm}"}


def _continuous_shutdown(host, vm: str, rel: Relationship, running: bool) -> bool:
    """Shut a mirrored VM down while listening to its monitor: True if the mirror was in
    sync and reported no error until QEMU exited (every write it acknowledged is on the
    replica), False if a final cycle is needed."""
    from ..errors import HypervisorError
    host.store.update_relationship(vm, preparing=True)     # the watchdog stands down
    in_sync = rel.sync_state == "in_sync"
    if not running:
        host.continuous.stop(vm)
        return False
    mon = None
    try:
        mon = host.driver.watch_monitor(vm) if in_sync else None
        if mon is not None:
            # Healthy now, with the events listened to from here on until QEMU exits.
            jobs = host.driver.mirror_status(vm, mon=mon)
            in_sync = all(d in jobs and jobs[d].get("io-status") == "ok"
                          and not jobs[d].get("paused") for d in rel.disks)
    except HypervisorError:
        in_sync = False
    host.event("failover", "shutting the VM down for a planned failover", vm)
    host.driver.stop(vm, force=False)
    clean = in_sync
    if mon is not None:
        try:
            while True:                      # the events QEMU sent before it exited
                mon.wait_event("BLOCK_JOB_ERROR", 2.0)
                clean = False
        except HypervisorError:
            pass                             # monitor closed: QEMU is gone
        finally:
            mon.close()
        clean = clean and not any(e["event"] == "BLOCK_JOB_ERROR" for e in mon.events)
    host.continuous.stop(vm)
    return clean


def cancel(host, vm: str) -> dict:
    rel = relationship_of(host, vm)
    if rel.state != State.PREPARED_FOR_FAILOVER.value:
        raise Conflict(f"{vm} is not prepared for failover (state {rel.state})")
    host.store.set_state(vm, State.REPLICATING.value)
    try:
        # A normal cycle tells the replica the primary is no longer prepared.
        run_cycle(host, vm)
    except Exception:
        host.store.set_state(vm, State.PREPARED_FOR_FAILOVER.value)
        raise
    host.event("failover", "planned failover cancelled on the primary", vm)
    return {"vm": vm, "state": State.REPLICATING.value}
