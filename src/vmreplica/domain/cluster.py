"""SafeKit-style states of a cluster-protected VM on each node. Pure.

PRIM   the VM runs here and its replica on the other node is in sync (continuous mode)
ALONE  the VM runs here, the other node does not have every write (down, resyncing)
SECOND the VM runs on the other node, in sync with this node's replica
WAIT   this node is up but not in sync yet (a resync or catch-up in progress)
STOP   this node is down (or its vmreplica daemon is)
"""

from __future__ import annotations


def node_state(node_online: bool, running_here: bool, running_elsewhere: bool,
               active_in_sync: bool) -> str:
    if not node_online:
        return "STOP"
    if running_here:
        return "PRIM" if active_in_sync else "ALONE"
    if running_elsewhere and active_in_sync:
        return "SECOND"
    return "WAIT"


def vm_states(nodes: dict[str, bool], running_on: list[str], active_in_sync: bool) -> dict:
    return {n: node_state(up, n in running_on, any(o != n for o in running_on),
                          active_in_sync and len(running_on) == 1)
            for n, up in nodes.items()}
