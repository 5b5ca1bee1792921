"""Relationship states, per side, and the transitions the daemon may make between them.

The table is the single source of truth: every state write goes through
``Store.set_state``, which asks ``check_transition`` first, so an impossible move (e.g. a
failed-over replica taking a cycle) is an error at the place it is attempted, not a
mystery later. A unit test fails if any module writes a state another way.
"""

from __future__ import annotations

import enum

from ..errors import Conflict
from .relationship import Relationship


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
# Every move the product makes, and why (Store.set_state checks each against this; a
# state written any other way fails tests/unit/test_state_writes.py). Staying in a state
# is always allowed (other fields change).
_TRANSITIONS: dict[State, set[State]] = {
    # primary: initial copy (network, seed export, or a copy the replica holds: resync)
    S.READY_FOR_INITIAL: {S.INITIAL_IN_PROGRESS, S.RESYNC_REQUIRED, S.SUSPENDED, S.ERROR,
                          S.STANDBY},
    S.INITIAL_IN_PROGRESS: {S.REPLICATING, S.READY_FOR_INITIAL, S.RESYNC_REQUIRED, S.ERROR,
                            S.STANDBY},
    # replica: an initial copy, or a resync onto a copy it adopted
    S.WAITING_FOR_INITIAL: {S.REPLICATING, S.RESYNCHRONIZING, S.ERROR},
    # both sides; RESYNCHRONIZING: a resync arrives (replica), or reverse makes the old
    # primary the replica; STANDBY: a DR link whose VM moved to another host
    S.REPLICATING: {S.SUSPENDED, S.RESYNC_REQUIRED, S.RESYNCHRONIZING,
                    S.PREPARED_FOR_FAILOVER, S.FAILOVER_IN_PROGRESS, S.ERROR, S.STANDBY},
    S.SUSPENDED: {S.REPLICATING, S.READY_FOR_INITIAL, S.RESYNC_REQUIRED, S.RESYNCHRONIZING,
                  S.FAILOVER_IN_PROGRESS, S.ERROR, S.STANDBY},
    S.RESYNC_REQUIRED: {S.RESYNCHRONIZING, S.SUSPENDED, S.ERROR, S.STANDBY},
    S.RESYNCHRONIZING: {S.REPLICATING, S.RESYNC_REQUIRED, S.ERROR, S.STANDBY},
    # primary: cancelled, or reversed (the old primary becomes the replica)
    S.PREPARED_FOR_FAILOVER: {S.REPLICATING, S.RESYNCHRONIZING, S.ERROR},
    S.FAILOVER_IN_PROGRESS: {S.REPLICATING, S.FAILED_OVER, S.ERROR},
    # reverse: the host that failed over becomes the primary and resynchronizes
    S.FAILED_OVER: {S.RESYNCHRONIZING},
    S.ERROR: {S.REPLICATING, S.RESYNC_REQUIRED, S.RESYNCHRONIZING, S.SUSPENDED,
              S.READY_FOR_INITIAL, S.FAILOVER_IN_PROGRESS, S.STANDBY},
    S.STANDBY: {S.RESYNC_REQUIRED, S.ERROR},
}

# States in which the primary runs scheduled cycles.
CYCLING = {S.REPLICATING}


def check_transition(current: State | str, new: State | str) -> State:
    cur, nxt = State(current), State(new)
    if nxt != cur and nxt not in _TRANSITIONS[cur]:
        raise Conflict(f"cannot go from {cur.value} to {nxt.value}")
    return nxt


def suspend_allowed(state: State | str) -> bool:
    return State(state) in {S.REPLICATING, S.READY_FOR_INITIAL, S.RESYNC_REQUIRED, S.ERROR}


def next_step(rel: Relationship) -> str | None:
    """What the operator should do next, as a command (shown by `status`)."""
    vm, peer, state, role = rel.vm, rel.peer, rel.state, rel.role
    if rel.fenced:
        return f"{peer} is the primary now: run `vmreplica reverse {vm}` on {peer}"
    if rel.test:
        return f"test failover running ({rel.test['vm']}): `vmreplica failover {vm} --stop-test`"
    steps: dict[tuple[str | None, str], str] = {
        ("primary", "ready_for_initial"): f"vmreplica initial {vm}",
        ("primary", "suspended"): f"vmreplica resume {vm}",
        ("primary", "prepared_for_failover"): f"on {peer}: vmreplica failover {vm}",
        ("replica", "failover_in_progress"): f"vmreplica failover {vm} --complete (or --cancel)",
        ("replica", "failed_over"): f"vmreplica reverse {vm}",
        ("primary", "standby"): f"the VM runs on another host, which takes this DR link "
                                f"over (`vmreplica dr adopt {vm.partition('@')[0]}` there)",
    }
    return steps.get((role, state))
