"""`cluster protect` and the cluster actions (checker suspend/resume, move, unprotect)."""

from __future__ import annotations

import time

from ..domain.relationship import DEFAULTS, POINT_INTERVAL_TEXT
from ..errors import UsageError
from . import pacemaker


def protect(host, body: dict) -> dict:
    """Continuous replication to the other node plus the Pacemaker resource. A VM not
    replicated yet is enabled (continuous; an existing libvirt domain's NICs mapped by
    ``network_map``, as `enable --network-map`) and seeded; one replicated already is
    switched to continuous mode as `set --mode continuous` switches it (refused the
    same way: a disk tracked by hash scan cannot be mirrored)."""
    from ..primary import relationship as prim
    from ..primary import seeding
    vm = str(body.get("vm") or "")
    homes = str(body.get("homes") or "")
    if "=" not in homes:
        raise UsageError("--homes is required: NODE=HOME for both nodes",
                         hint="e.g. --homes node1=/srv/vmr/node1,node2=/srv/vmr/node2")
    stop_mode = body.get("stop_mode") or "stop"
    if stop_mode not in ("stop", "save", "off"):
        raise UsageError(f"unknown stop mode {stop_mode!r}", hint="choose stop, save or off")
    network_map = list(body.get("network_map") or [])
    rel = host.store.relationship(vm)
    if rel is None:
        prim.enable(host, vm, str(body.get("peer") or ""), frequency="30s",
                    mode="continuous",
                    max_stall=float(body.get("max_stall") or DEFAULTS.max_stall),
                    history=int(body.get("history", DEFAULTS.history)),
                    point_interval=body.get("point_interval") or POINT_INTERVAL_TEXT,
                    cluster=True, network_map=network_map)
        seeding.initial(host, vm)
    elif rel.role != "primary":
        raise UsageError(f"run `cluster protect` on the node where {vm} runs (its primary)")
    elif network_map:
        raise UsageError(f"{vm} is replicated already: its replica VM's networks were mapped "
                         "when replication was enabled",
                         hint=f"protect it without --network-map, or `vmreplica remove {vm}` "
                              "first")
    else:
        if rel.mode != "continuous":      # (checked as `set --mode continuous` checks it)
            from ..primary import settings
            settings.apply(host, vm, {"mode": "continuous"})
        host.store.update_relationship(vm, cluster=True)
    pacemaker.ensure_daemon_clone(homes)
    rid = pacemaker.add_vm_resource(vm, homes, stop_mode, int(body.get("stop_timeout") or 60),
                                    body.get("prefer"))
    host.event("cluster", f"protected by the cluster as {rid} (stop mode {stop_mode})", vm)
    return {"vm": vm, "resource": rid, "stop_mode": stop_mode}


def action(host, vm: str, what: str, body: dict) -> dict:
    if what == "checker-suspend":
        pacemaker.set_maintenance(vm, True)
        host.event("cluster", "VM checker suspended (maintenance: no restart, no failover)", vm)
    elif what == "checker-resume":
        pacemaker.set_maintenance(vm, False)
        pacemaker.cleanup(vm)
        host.event("cluster", "VM checker resumed", vm)
    elif what == "move":
        node = str(body.get("node") or "")
        pacemaker.move(vm, node)
        deadline = time.monotonic() + float(body.get("timeout") or 300)
        while time.monotonic() < deadline:
            if pacemaker.nodes_and_resources()["resources"].get(pacemaker.rsc(vm)) == [node]:
                break
            time.sleep(0.5)
        else:
            pacemaker.clear_move(vm)
            raise UsageError(f"{vm} did not move to {node} in time")
        pacemaker.clear_move(vm)       # stickiness keeps it there
        host.event("cluster", f"moved to {node}", vm)
    elif what == "unprotect":
        pacemaker.remove_vm_resource(vm)
        rel = host.store.relationship(vm)
        if rel is not None:
            host.store.update_relationship(vm, cluster=False)
        host.event("cluster", "no longer protected by the cluster", vm)
    else:
        raise UsageError(f"unknown cluster action {what!r}")
    return {"vm": vm, "action": what}
