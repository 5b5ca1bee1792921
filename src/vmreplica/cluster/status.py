"""`vmreplica cluster status`: Pacemaker's view (nodes, where each VM runs) joined with
the replication's (is the active node's mirror in sync), per VM and node."""

from __future__ import annotations

from ..domain.cluster import vm_states
from ..errors import VmreplicaError
from . import pacemaker
from .agent import node_name


def local_view(host, vm: str) -> dict:
    rel = host.store.relationship(vm)
    if rel is None:
        return {"vm": vm, "role": "none"}
    return {"vm": vm, "role": rel.role, "state": rel.state,
            "sync_state": rel.sync_state, "peer": rel.peer, "epoch": rel.epoch,
            "fenced": rel.fenced}


def cluster_status(host) -> dict:
    pm = pacemaker.nodes_and_resources()
    out = {"quorum": pm["quorum"], "nodes": pm["nodes"], "vms": []}
    for rel in host.store.relationships():
        if not rel.cluster:
            continue
        vm = rel.vm
        running_on = pm["resources"].get(pacemaker.rsc(vm), [])
        # The replication as the node that runs the VM sees it: in sync only when that node
        # is the primary and its mirror has every write (a node that failed over and has
        # not reversed yet is the primary of nothing: its VM runs ALONE).
        active: dict = {}
        if len(running_on) == 1 and running_on[0] == node_name():
            active = local_view(host, vm)
        elif len(running_on) == 1:
            try:
                active = host.client_for_peer(rel.peer, timeout=5).request(
                    "GET", f"/v1/cluster/relationships/{vm}")
            except VmreplicaError:
                active = {}
        in_sync = active.get("role") == "primary" and active.get("sync_state") == "in_sync" \
            and not active.get("fenced")
        out["vms"].append({
            "vm": vm, "resource": pacemaker.rsc(vm), "running_on": running_on,
            "in_sync": in_sync, "states": vm_states(pm["nodes"], running_on, in_sync),
            "failcounts": {n: c for (r, n), c in pm["failcounts"].items()
                           if r == pacemaker.rsc(vm)},
            "maintenance": False})
    return out
