"""Planned failover on the primary: `failover VM --prepare [--shutdown]` and its cancel.

The VM must be off (or is shut down cleanly first); a final cycle ships every write it
made, marked final, so the replica knows it may fail over with zero loss. Until the
replica fails over, the VM here cannot be started (`failover VM --cancel` undoes it).
"""

from __future__ import annotations

from ..domain.states import State
from ..errors import Conflict
from .cycle import run_cycle


def prepare(host, vm: str, shutdown: bool = False) -> dict:
    from .relationship import _rel
    rel = _rel(host, vm)
    if rel["state"] == State.PREPARED_FOR_FAILOVER.value:
        raise Conflict(f"{vm} is already prepared for failover",
                       hint=f"next, on {rel['peer']}: `vmreplica failover {vm}`")
    if rel["state"] != State.REPLICATING.value:
        raise Conflict(f"{vm} cannot be prepared for failover in state {rel['state']}",
                       hint="it must be replicating (initial copy done, not suspended)")
    info = host.driver.inspect(vm)
    if info.state == "running":
        if not shutdown:
            raise Conflict(f"{vm} is running: a planned failover needs it off",
                           hint=f"shut it down first, or add --shutdown "
                                f"(`vmreplica failover {vm} --prepare --shutdown`)")
        host.event("failover", "shutting the VM down for a planned failover", vm)
        host.driver.stop(vm, force=False)
    stats = run_cycle(host, vm, final=True)
    host.store.update_relationship(vm, state=State.PREPARED_FOR_FAILOVER.value)
    host.event("failover", f"prepared for planned failover: final cycle {stats['cycle']} "
                           f"acknowledged by {rel['peer']}", vm)
    return {"vm": vm, "state": State.PREPARED_FOR_FAILOVER.value, "final_cycle": stats["cycle"],
            "raw_bytes": stats["raw_bytes"],
            "next": f"on {rel['peer']}: vmreplica failover {vm}"}


def cancel(host, vm: str) -> dict:
    from .relationship import _rel
    rel = _rel(host, vm)
    if rel["state"] != State.PREPARED_FOR_FAILOVER.value:
        raise Conflict(f"{vm} is not prepared for failover (state {rel['state']})")
    host.store.update_relationship(vm, state=State.REPLICATING.value)
    try:
        # A normal cycle tells the replica the primary is no longer prepared.
        run_cycle(host, vm)
    except Exception:
        host.store.update_relationship(vm, state=State.PREPARED_FOR_FAILOVER.value)
        raise
    host.event("failover", "planned failover cancelled on the primary", vm)
    return {"vm": vm, "state": State.REPLICATING.value}
