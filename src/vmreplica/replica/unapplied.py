"""Staged cycles not applied whole, and the rule that nothing reads their heads.

A delta is staged durably before it is applied. When its apply fails (the replica's
storage is full, a write or a flush fails) or the sync of its checkpoint fails, the
heads hold part of it: a recovery point, a test failover, a failover, a compare or a
mirror started on them would read a torn mix of two cycles. So the VM is marked here
(``apply_pending`` on the relationship, and in ``host.unapplied`` for the lock), the
stage is kept, and the VM's lock (service.host.VMLock) applies every staged cycle
again, whole, before it lets any operation in (recovery.redo_unapplied); the
scheduler retries on its own, so a replica whose storage filled up catches up by
itself once there is room. Until then health is critical, with the storage and the
space it needs.

A redo is handled as a crash: the heads are closed, evicted from the page cache, checked
and repaired, and every staged cycle is written again with O_DIRECT and synced before it
is recorded. (After a failed writeback Linux marks the failed pages clean while the
disk holds the old data: a later fdatasync returns 0 and proves nothing, so a failed
sync is never simply retried.)
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..domain.states import State, check_transition
from ..errors import Conflict, OperationError, StorageFull, VmreplicaError

MiB = 1 << 20


def free_space(storage: str) -> int | None:
    """The bytes free on the file system of ``storage`` (None: it cannot be read)."""
    try:
        return shutil.disk_usage(storage).free
    except OSError:
        return None


def mark(host, vm: str, cycle: int, stage: Path | str | None,
         error: BaseException) -> VmreplicaError:
    """A delta's apply (or its checkpoint) failed: its stage is kept and the VM's heads
    are read by nothing until it is applied again. Returns the error to raise, which
    says why, what is needed and what happens next."""
    rel = host.store.relationship(vm)
    storage = str(rel.storage)
    needed = None
    if stage is not None:
        try:
            needed = os.path.getsize(stage)
        except OSError:
            pass
    free = free_space(storage)
    reason = getattr(error, "message", None) or str(error) or type(error).__name__
    if isinstance(error, StorageFull):
        message = (f"the replica storage {storage} on {host.name} is full: cycle {cycle} is "
                   f"staged but not applied ({_mib(free)} free, about {_mib(needed)} needed "
                   f"for it)")
        hint = (f"free space or grow {storage} on {host.name}: the staged cycle is applied by "
                "itself once there is room; until then nothing reads the replica's newest "
                "state (no recovery point, test failover or failover)")
        cls: type[OperationError] = StorageFull
    else:
        message = (f"cycle {cycle} is staged on {host.name} but could not be applied: "
                   f"{reason}")
        hint = (f"see `vmreplica events {vm}` on {host.name}: the staged cycle is applied "
                "again before anything reads the replica")
        cls = OperationError
    host.store.update_relationship(vm, apply_pending={
        "cycle": cycle, "error": message, "code": cls.code, "storage": storage,
        "needed_bytes": needed, "free_bytes": free, "since": time.time()})
    host.unapplied.add(host.lock_key(vm))
    host.event("apply", message, vm)
    return cls(message, hint=hint)


def clear(host, vm: str, cycles: list[int]) -> None:
    rel = host.store.relationship(vm)
    if rel is not None and rel.apply_pending:
        host.store.update_relationship(vm, apply_pending=None)
        if cycles:
            host.event("apply", "staged cycle(s) " + ", ".join(map(str, cycles)) +
                       " applied whole: the replica is readable again", vm)
    host.unapplied.discard(host.lock_key(vm))


def refusal(host, vm: str, error: BaseException) -> VmreplicaError:
    """What a VM's lock raises when its staged cycles still cannot be applied."""
    rel = host.store.relationship(vm)
    pending = (rel.apply_pending if rel else None) or {}
    message = pending.get("error") or (getattr(error, "message", None) or str(error))
    free = free_space(pending["storage"]) if pending.get("storage") else None
    if pending.get("code") == StorageFull.code:
        pending = dict(pending, free_bytes=free)
        host.store.update_relationship(vm, apply_pending=pending)
        return StorageFull(
            f"{message}; now {_mib(free)} free",
            hint=f"free space or grow {pending['storage']} on {host.name}: the staged cycle "
                 "is applied by itself once there is room")
    return Conflict(f"{vm}'s replica on {host.name} holds a cycle not applied whole: "
                    f"{message}",
                    hint=f"see `vmreplica events {vm}` on {host.name}")


def lost(host, vm: str, cycles: list[int]) -> None:
    """Staged rows whose files are gone: cycles that may have been acknowledged are lost,
    so the replica cannot be trusted to equal the primary's last point. The relationship
    needs a resynchronization (the primary's next cycle is refused and tells it so)."""
    rel = host.store.relationship(vm)
    for c in cycles:
        host.store.remove_staged(vm, c)
    reason = (f"the staged cop{'y' if len(cycles) == 1 else 'ies'} of cycle(s) "
              f"{', '.join(map(str, cycles))} went missing on {host.name}: a resynchronization "
              "is required")
    state = State(rel.state)
    try:
        new = check_transition(state, State.RESYNC_REQUIRED)
    except Conflict:
        new = state
    host.store.set_state(vm, new.value, resync_reason=reason,
                                   index_valid=False)
    host.event("recovery", reason, vm)


def failed_at_start(host, vm: str, error: BaseException) -> None:
    """Start-up recovery of one VM failed: a full storage keeps the stage for a later redo;
    anything else puts the relationship in ``error`` with its reason (the stage is kept,
    so nothing reads the torn heads). Other VMs start regardless."""
    rows = host.store.staged(vm)
    cycle = rows[-1]["cycle"] if rows else -1
    stage = rows[-1]["path"] if rows else None
    refused = mark(host, vm, cycle, stage, error)
    if isinstance(refused, StorageFull):
        return
    rel = host.store.relationship(vm)
    try:
        new = check_transition(rel.state, State.ERROR)
    except Conflict:
        new = State(rel.state)
    host.store.set_state(vm, new.value,
                                   last_error=f"start-up recovery failed: {refused.message}")
    host.event("recovery", f"start-up recovery of {vm} failed, the relationship is in error: "
                           f"{refused.message}", vm)


def _mib(n: int | None) -> str:
    return "? MiB" if n is None else f"{n / MiB:.1f} MiB"
