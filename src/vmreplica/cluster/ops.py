"""What a cluster node does to become a VM's primary (the resource agent's `start`), and
what the active node does when its peer comes back.

- peer up: a planned hand-over — the peer shuts the VM down and ships the last changes
  (in continuous mode nothing is left to ship), this node fails over (planned, zero
  loss) and reverses replication (only differences move);
- peer gone (Pacemaker fenced it): an unplanned failover from the newest state — in
  continuous mode that is every write the guest saw acknowledged — committed at once;
  when the peer returns it learns it was replaced (epochs) and becomes the replica.
"""

from __future__ import annotations

import logging
import time

from ..domain.states import State
from ..domain.units import format_size
from ..errors import Conflict, OperationError, Unreachable, VmreplicaError

log = logging.getLogger("vmreplica.cluster")


def take_over(host, vm: str) -> dict:
    from ..primary.dr import adopt_quietly  # a DR link follows the VM (primary.dr)
    rel = host.store.relationship(vm)
    if rel is None:
        raise Conflict(f"{vm} is not replicated on {host.name}: protect it first "
                       "(`vmreplica cluster protect`)")
    if rel.role == "primary":
        if rel.fenced:
            raise Conflict(f"{vm} is fenced on {host.name}: {rel.fenced}")
        adopt_quietly(host, vm)
        return {"vm": vm, "how": "already primary"}
    from ..replica import failover as rfo
    if rel.state in (State.FAILOVER_IN_PROGRESS.value,):
        rfo.complete(host, vm)
        adopt_quietly(host, vm)
        return {"vm": vm, "how": "completed a failover in progress"}
    if rel.state == State.FAILED_OVER.value:
        adopt_quietly(host, vm)
        return {"vm": vm, "how": "already failed over here"}
    how = "unplanned"
    try:
        host.client_for_peer(rel.peer, timeout=180).request(
            "POST", f"/v1/cluster/relationships/{vm}/handover", {"epoch": rel.epoch})
        how = "planned"
    except Unreachable:
        pass                                  # the peer is down (fenced): unplanned
    except VmreplicaError as e:
        log.warning("planned hand-over of %s refused by %s: %s; failing over unplanned",
                    vm, rel.peer, e.message)
    # Pacemaker decided (with fencing): no asking the peer whether it still runs the VM.
    info = rfo.start(host, vm, force=True)
    if not info["planned"]:
        rfo.complete(host, vm)
    host.event("cluster", f"took over {vm} ({how} failover)", vm)
    if how == "planned":
        try:
            _reverse(host, vm)
        except VmreplicaError as e:
            log.warning("reverse after the hand-over of %s: %s (retried)", vm, e.message)
    adopt_quietly(host, vm)
    return {"vm": vm, "how": how}


def handover(host, peer: dict, vm: str, body: dict) -> dict:
    """On the primary, asked by its replica (the node Pacemaker moves the VM to): shut
    down and ship everything — a planned failover's first half."""
    from ..primary.planned import prepare
    rel = host.store.relationship(vm)
    if rel is None or rel.role != "primary" or rel.peer != peer["name"]:
        raise Conflict(f"{host.name} is not the primary of {vm} for {peer['name']}")
    if not rel.cluster:
        raise Conflict(f"{vm} is not protected by the cluster on {host.name}")
    if rel.state == State.PREPARED_FOR_FAILOVER.value:
        return {"vm": vm, "prepared": True}
    return prepare(host, vm, shutdown=True)


def tick(host) -> None:
    """The active node: once the peer of a failed-over cluster VM answers again, make it
    the replica (reverse: only the differences move)."""
    for rel in host.store.relationships():
        if not rel.cluster or rel.role != "replica" or \
                rel.state != State.FAILED_OVER.value:
            continue
        if time.time() < float(rel.next_reverse_at or 0):
            continue
        host.store.update_relationship(rel.vm, next_reverse_at=time.time() + 3)
        try:
            info = _reverse(host, rel.vm)
            host.event("cluster", f"{rel.peer} is back: it is the replica again; "
                                  f"resynchronized {format_size(info['bytes_moved'])} of "
                                  f"{format_size(info['disk_bytes'])}", rel.vm)
        except OperationError:
            pass                               # still away; tried again in a moment


def _reverse(host, vm: str) -> dict:
    """`reverse` as service.operations.reverse runs it (this layer is below the service):
    the failed-over VM's chain merged into plain disks of its own, then this node is the
    primary."""
    from ..primary import reverse as preverse
    from ..replica import collapse
    preverse.check(host, vm)
    collapse.ensure(host, vm)
    return preverse.reverse(host, vm)
