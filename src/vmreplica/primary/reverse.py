"""Reverse replication, on the host that failed over: it becomes the primary and the old
primary becomes its replica. Only the blocks that differ move: the old primary sends the
block digests of what it holds, this host compares them with its own frozen view and
ships the differences (never a blind full copy). Failback is the same command after a
planned failover back.
"""

from __future__ import annotations

import time

from ..domain.relationship import Relationship
from ..domain.states import Role, State
from ..errors import Conflict, NotFound, UsageError
from .resync import resync


def check(host, vm: str) -> Relationship:
    """The relationship of ``vm`` if it can be reversed here: this host failed it over."""
    rel = host.store.relationship(vm)
    if rel is None:
        raise NotFound(f"{host.name} has no relationship of {vm}")
    if rel.role != Role.REPLICA.value or rel.state != State.FAILED_OVER.value:
        if rel.role == Role.PRIMARY.value:
            raise UsageError(f"{host.name} is already the primary of {vm}")
        raise Conflict(f"{vm} has not failed over to {host.name} (state {rel.state})",
                       hint=f"fail over first: `vmreplica failover {vm}` (then --complete for "
                            "an unplanned failover)")
    return rel


def reverse(host, vm: str) -> dict:
    """Make this host, where ``vm`` failed over, its primary. The failed-over VM must run
    on plain disks of its own first: the caller has merged its chain out of the replica
    storage (``check``, then replica.collapse.ensure, then this: service.operations and
    cluster.ops compose the three; primary/ does not reach into the replica's store)."""
    rel = check(host, vm)
    info = host.driver.inspect(vm)
    desc = host.driver.describe(vm)
    desc["disks"] = [d for d in desc["disks"] if d["name"] in rel.disks]
    client = host.client_for_peer(rel.peer, timeout=120)
    client.request("POST", f"/v1/replica/relationships/{vm}/reverse", {
        "id": rel.id, "epoch": rel.epoch, "description": desc,
        "history": rel.history, "frequency": rel.frequency})
    host.store.set_state(
        vm, State.RESYNCHRONIZING.value, why="reverse: this host is the primary now",
        role=Role.PRIMARY.value, cycle=-1, bitmap=None,
        tracker="bitmap", consecutive_failures=0, last_error=None, last_point_at=None,
        points_made=0, failover=None, test=None, reversed_at=time.time(), sync_state=None,
        sync_reason=None, peer_told=None, reip=None,
        # The failover IPs were this host's addresses: the new replica has none yet.
        failover_ips=[])
    host.event("relationship", f"reverse replication: {host.name} is the primary of {vm}, "
                               f"{rel.peer} its replica (epoch {rel.epoch})"
               + (f"; its failover IPs (addresses on {host.name}) are cleared: set "
                  f"those for {rel.peer} with `vmreplica set {vm} --failover-ip`"
                  if rel.failover_ips else ""), vm)
    stats = resync(host, vm)
    size = sum(d.virtual_size for d in info.disks if d.name in rel.disks)
    return {"vm": vm, "primary": host.name, "replica": rel.peer, "epoch": rel.epoch,
            "bytes_moved": stats["raw_bytes"] + stats["zero_bytes"], "disk_bytes": size,
            "compared_bytes": stats.get("compared_bytes"), "seconds": stats["seconds"]}
