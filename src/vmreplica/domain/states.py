"""Relationship states, per side, and the transitions the daemon may make between them.

The table is the single source of truth: the service asks ``check_transition`` before
it writes a new state, so an impossible move (e.g. a suspended relationship shipping a
cycle) is an error at the place it is attempted, not a mystery later.
"""

from __future__ import annotations

import enum

from ..errors import Conflict


class State(str, enum.Enum):
    READY_FOR_INITIAL = "ready_for_initial"
    INITIAL_IN_PROGRESS = "initial_in_progress"
    WAITING_FOR_INITIAL = "waiting_for_initial"  # replica side
    REPLICATING = "replicating"
    SUSPENDED = "suspended"
    RESYNC_REQUIRED = "resync_required"
    RESYNCHRONIZING = "resynchronizing"
    PREPARED_FOR_FAILOVER = "prepared_for_failover"
    FAILOVER_IN_PROGRESS = "failover_in_progress"
    FAILED_OVER = "failed_over"
    ERROR = "error"
    STANDBY = "standby"      # a DR link whose VM runs on the partner host (domain.links)


class Role(str, enum.Enum):
    PRIMARY = "primary"
    REPLICA = "replica"
    NONE = "none"


S = State
_TRANSITIONS: dict[State, set[State]] = {
    S.READY_FOR_INITIAL: {S.INITIAL_IN_PROGRESS, S.SUSPENDED, S.ERROR},
    S.INITIAL_IN_PROGRESS: {S.REPLICATING, S.READY_FOR_INITIAL, S.ERROR},
    S.WAITING_FOR_INITIAL: {S.REPLICATING, S.ERROR},
    S.REPLICATING: {S.SUSPENDED, S.RESYNC_REQUIRED, S.PREPARED_FOR_FAILOVER,
                    S.FAILOVER_IN_PROGRESS, S.ERROR, S.REPLICATING},
    S.SUSPENDED: {S.REPLICATING, S.READY_FOR_INITIAL, S.RESYNC_REQUIRED, S.ERROR},
    S.RESYNC_REQUIRED: {S.RESYNCHRONIZING, S.SUSPENDED, S.ERROR},
    S.RESYNCHRONIZING: {S.REPLICATING, S.RESYNC_REQUIRED, S.ERROR},
    S.PREPARED_FOR_FAILOVER: {S.REPLICATING, S.FAILED_OVER, S.ERROR},
    S.FAILOVER_IN_PROGRESS: {S.REPLICATING, S.FAILED_OVER, S.ERROR},
    S.FAILED_OVER: set(),
    S.ERROR: {S.REPLICATING, S.RESYNC_REQUIRED, S.SUSPENDED, S.READY_FOR_INITIAL},
    S.STANDBY: {S.RESYNC_REQUIRED, S.ERROR},
}

# States in which the primary runs scheduled cycles.
CYCLING = {S.REPLICATING}


def check_transition(current: State | str, new: State | str) -> State:
    cur, nxt = State(current), State(new)
    if nxt not in _TRANSITIONS[cur]:
        raise Conflict(f"cannot go from {cur.value} to {nxt.value}")
    return nxt


def suspend_allowed(state: State | str) -> bool:
    return State(state) in {S.REPLICATING, S.READY_FOR_INITIAL, S.RESYNC_REQUIRED, S.ERROR}


def next_step(rel: dict) -> str | None:
    """What the operator should do next, as a command (shown by `status`)."""
    vm, peer, state, role = rel["vm"], rel.get("peer"), rel["state"], rel.get("role")
    if rel.get("fenced"):
        return f"{peer} is the primary now: run `vmreplica reverse {vm}` on {peer}"
    if rel.get("test"):
        return f"test failover running ({rel['test']['vm']}): `vmreplica failover {vm} --stop-test`"
    steps = {
        ("primary", "ready_for_initial"): f"vmreplica initial {vm}",
        ("primary", "suspended"): f"vmreplica resume {vm}",
        ("primary", "prepared_for_failover"): f"on {peer}: vmreplica failover {vm}",
        ("replica", "failover_in_progress"): f"vmreplica failover {vm} --complete (or --cancel)",
        ("replica", "failed_over"): f"vmreplica reverse {vm}",
        ("primary", "standby"): f"the VM runs on another host, which takes this DR link "
                                f"over (`vmreplica dr adopt {vm.partition('@')[0]}` there)",
    }
    return steps.get((role, state))
