"""Resynchronisation: when change tracking cannot be trusted (a bitmap missing or
inconsistent, a VM restarted without it, a raw disk after a restart, pending changes
over the bound) or after a reverse, compare block digests of the frozen source with the
replica's hash index and ship only the blocks that differ. Automatic resyncs wait for
the relationship's resync window; `resync VM --now` does not.
"""

from __future__ import annotations

import time

from ..domain.relationship import Relationship
from ..domain.schedule import in_window, parse_window
from ..domain.states import State
from ..domain.units import format_size
from ..errors import Conflict
from .common import relationship_of
from .cycle import run_cycle

RESYNCABLE = {State.RESYNC_REQUIRED.value, State.REPLICATING.value, State.ERROR.value,
              State.RESYNCHRONIZING.value, State.SUSPENDED.value}


def window_open(rel: Relationship, now: float | None = None) -> bool:
    t = time.localtime(now if now is not None else time.time())
    return in_window(parse_window(rel.resync_window), t.tm_hour * 60 + t.tm_min)


def request(host, vm: str, now: bool = False) -> dict:
    """`resync VM [--now]`: run it, or (outside the window) leave it for the window."""
    rel = relationship_of(host, vm)
    if rel.fenced:
        raise Conflict(f"{vm} is fenced: {rel.fenced}")
    if rel.state not in RESYNCABLE:
        raise Conflict(f"{vm} cannot be resynchronized in state {rel.state}",
                       hint="it needs its initial copy first" if "initial" in rel.state
                       else None)
    if not now and not window_open(rel):
        host.store.set_state(vm, State.RESYNC_REQUIRED.value,
                                       resync_reason="requested by the operator")
        host.event("resync", f"resynchronization requested; it runs in the window "
                             f"{rel.resync_window}", vm)
        return {"vm": vm, "state": State.RESYNC_REQUIRED.value, "deferred": True,
                "window": rel.resync_window}
    return resync(host, vm)


def resync(host, vm: str) -> dict:
    """Ship only the blocks that differ from what the replica holds; then replicating."""
    rel = host.store.relationship(vm)
    host.store.set_state(vm, State.RESYNCHRONIZING.value)
    host.event("resync", "resynchronization started"
               + (f" ({rel.resync_reason})" if rel.resync_reason else ""), vm)
    try:
        stats = run_cycle(host, vm, mode="resync")
    except Exception:
        if host.store.relationship(vm).state == State.RESYNCHRONIZING.value:
            host.store.set_state(vm, State.RESYNC_REQUIRED.value)
        raise
    host.store.set_state(vm, State.REPLICATING.value, resync_reason=None,
                         resync_window_seen=False, resync_window_missed=False,
                         replicating_since=rel.replicating_since or time.time())
    moved = stats["raw_bytes"] + stats["zero_bytes"]
    host.event("resync", f"resynchronized: {format_size(moved)} moved, "
                         f"{format_size(stats.get('compared_bytes') or 0)} compared", vm)
    stats["bytes_moved"] = moved
    return stats
