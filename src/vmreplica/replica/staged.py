"""A staged cycle applied into the heads and recorded as applied.

The one way a cycle's records reach the heads of a VM's chains: through the VM's head
server (replica.apply), with the hash index kept beside them, then the relationship
records the cycle as applied (and makes the recovery point the cycle asked for). Used by
the intake of a cycle (replica.receiver) as it arrives, and by the redo of a staged cycle
after a crash or a failed apply (replica.recovery).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..domain.relationship import Relationship
from ..domain.states import State
from ..errors import StorageFull
from ..transport import wire
from . import apply as applier
from . import checkpoint, nvram, points
from . import index as rindex
from . import store as rstore


def apply_staged(host, vm: str, cycle: int, path: Path, records=None, trailer=None,
                 header: dict | None = None, durable: bool = True,
                 direct: bool = False) -> dict:
    """Apply staged cycle ``path`` (from ``records`` if they are still in memory). Not
    ``durable``: the hash index is synced and the stage dropped after the ack
    (replica.checkpoint). ``direct``: O_DIRECT heads (a redo after a failure)."""
    rel = host.store.relationship(vm)
    heads = rstore.heads(rel.chains, rel.disks)
    if records is None:
        with open(path, "rb") as f:
            reader = wire.reader_for_file(f)
            header = reader.start()
            stats = write_heads(host, vm, heads, reader.records(), bool(header.get("verify")),
                                durable, direct)
            trailer = reader.trailer
    else:
        stats = write_heads(host, vm, heads, records, bool(header and header.get("verify")),
                            durable, direct)
    if durable:
        record_applied(host, vm, cycle, header, trailer)
        host.store.remove_staged(vm, cycle)
        path.unlink(missing_ok=True)
    else:
        # Any fsync now would wait for the disk to take the cycle's writes (it flushes
        # the disk's cache): the record waits for the checkpoint's, the stage redoes it.
        with host.store.unsynced():
            record_applied(host, vm, cycle, header, trailer)
        checkpoint.defer(host, vm, cycle, path, heads,
                         [str(rindex.path(Path(rel.storage), vm, d)) for d in rel.disks])
    return {"records": stats["records"], "bytes": stats["bytes"],
            "write_seconds": stats["write_seconds"], "flush_seconds": stats["flush_seconds"],
            **manifest_of(rel, stats)}


def manifest_of(rel: Relationship, stats: dict) -> dict:
    """The heads' block digests an apply with ``verify`` read, by disk (for the answer)."""
    if "manifest" not in stats:
        return {}
    return {"manifest": dict(zip(rel.disks, stats["manifest"], strict=False))}


def record_applied(host, vm: str, cycle: int, header: dict | None,
                   trailer: dict | None) -> None:
    """The relationship records ``cycle`` as applied (and leaves waiting_for_initial or
    resynchronizing for replicating); the recovery point it asked for is made."""
    rel = host.store.relationship(vm)
    trailer = trailer or {}
    changes = {"last_applied_cycle": cycle, "last_applied_at": time.time(),
               "last_freeze_at": trailer.get("freeze_time"),
               "epoch": max(rel.epoch, int(trailer.get("epoch", 0)))}
    state = None
    if rel.state in (State.WAITING_FOR_INITIAL.value, State.RESYNCHRONIZING.value):
        state = State.REPLICATING
        changes["replicating_since"] = rel.replicating_since or time.time()
    # Only the primary's final cycle (VM off, prepared) allows a planned failover; any
    # later cycle means the primary runs again.
    changes["primary_prepared"] = {"cycle": cycle, "at": time.time()} if trailer.get("final") \
        else None
    digest = nvram.keep(rel, trailer)       # (synced before the cycle is recorded)
    if digest:
        changes["nvram"] = digest
    if trailer.get("point") and rel.last_applied_cycle < cycle:
        # Recorded with the cycle, made right after: a crash in between makes it at start-up.
        changes["pending_point"] = {"kind": trailer["point"], "time": trailer.get("freeze_time")}
    if state is None:
        host.store.update_relationship(vm, **changes)
    else:
        host.store.set_state(vm, state, why=f"cycle {cycle} applied", **changes)
    make_pending_point(host, vm)


def make_pending_point(host, vm: str) -> None:
    rel = host.store.relationship(vm)
    pending = rel.pending_point
    if pending:
        points.create(host, vm, pending["kind"], pending["time"] or time.time())
        host.store.update_relationship(vm, pending_point=None)


def write_heads(host, vm: str, heads: list[str], records, verify: bool,
                durable: bool = True, direct: bool = False) -> dict:
    """Write ``records`` into ``heads``; ``direct`` for an initial copy's or a resync's
    bulk writes (replica.heads.HeadServer)."""
    rel = host.store.relationship(vm)
    server = host.heads.get(vm, heads, direct)
    try:
        paths = [rindex.path(Path(rel.storage), vm, d) for d in rel.disks]
        idx = rindex.IndexWriter(paths, [w.size for w in server.writers])
        stats = applier.apply_records(records, server, verify=verify, index=idx,
                                      durable=durable)
        # A verification read every head: the index takes what was read, so a head
        # changed behind vmreplica's back (what a failed verification finds) is repaired
        # by the resync that follows instead of being hidden by a stale index.
        for p, digests in zip(paths, stats.pop("digests", []), strict=False):
            rindex.write(p, digests)
        return stats
    except StorageFull as e:
        host.heads.close(vm)
        raise StorageFull(f"the replica storage {rel.storage} on {host.name} is full "
                          f"({e.message}); the cycle was not applied and the primary keeps "
                          "its changes",
                          hint=f"free space or grow {rel.storage} on {host.name}: the next "
                               "cycle sends the changes again") from None
    except BaseException:
        host.heads.close(vm)  # writes in an unknown state: start afresh next time
        raise
