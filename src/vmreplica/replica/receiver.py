"""The intake of a cycle on the replica: parse, stage, acknowledge, apply.

A cycle is staged durably first (records written as they arrive, each verified, then
fsync + rename + directory fsync + a synced row in the state store); a plain delta is
acknowledged then, and applied into the heads and flushed to the disk right after, on
the same thread and under the VM's lock (replica.applies: what takes the lock or shows
the VM waits for it). A cycle that makes a recovery point, a planned failover's last
and a verified one are applied before their ack (the point, the failover and the
verification read the heads), and so are a cycle too large to keep in memory and one
the replica's storage may not have room for. The hash index's fdatasync, the synced
record of the apply and the stage's removal follow later (replica.checkpoint). At
start-up every staged cycle still listed is applied again before the daemon serves
anything (replica.recovery; invariant 1: no torn head). An initial copy or a resync
(nothing consistent to protect yet) is applied as it streams in.

The replica's other entry points live with their concerns: a relationship's life
(replica.lifecycle), its removal (replica.removal), start-up recovery and the redo of
staged cycles (replica.recovery).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from ..domain.states import State
from ..domain.units import format_size
from ..qemutools import img
from ..qemutools.buffers import POOL
from ..transport import wire
from ..transport.ahead import ahead
from . import checks, mirror, unapplied
from . import index as rindex
from . import store as rstore
from .staged import apply_staged, manifest_of, record_applied, write_heads

log = logging.getLogger("vmreplica.replica")


class _Tee:
    """``read(n)`` from the request body, copying every byte read into the staging file."""

    def __init__(self, read, sink):
        self._read, self._sink = read, sink
        self.bytes = 0

    def read(self, n: int) -> bytes:
        piece = self._read(n)
        if piece:
            self._sink(piece)
            self.bytes += len(piece)
        return piece


KEEP_IN_MEMORY = 256 << 20  # a staged delta up to this size is applied from memory
APPLY_MARGIN = 64 << 20     # room beyond a cycle's bytes for an ack before the apply


def receive_cycle(host, peer: dict, vm: str, body,
                  acknowledge: Callable[[dict], None] | None = None) -> dict:
    """Receive one cycle. A delta is verified and staged durably, then (plain) sent to
    ``acknowledge`` and applied, or (a point, a planned failover's last, verified)
    applied and returned as the answer; checkpointed later (replica.checkpoint). An
    initial copy (nothing consistent to protect yet) is applied as it streams in, and
    the replica counts as seeded only once all of it is verified and synced. Without
    ``acknowledge`` every delta is applied before it is answered."""
    rel = checks.own_relationship(host, peer, vm)
    reader = wire.CycleReader(body.read, pool=POOL)
    header = reader.start()
    cycle = checks.check_header(host, rel, header)
    kind = "initial" if header.get("initial") else "resync" if header.get("resync") else "delta"
    lock = host.vm_lock(vm)
    # An initial copy or a resync rewrites the heads whatever they hold: it does not wait
    # for a staged cycle that cannot be applied (it supersedes it, below).
    # (``applying``: a delta acknowledged before its apply is shown as being applied
    # until its history row is written too.)
    with (lock if kind == "delta" else lock.as_is()), ExitStack() as applying:
        # A cycle means the primary is catching up (continuous mode dropped to cycles).
        mirror.close_target(host, vm)
        row = host.store.start_cycle(vm, cycle, kind)   # the replica's cycle history
        try:
            if kind == "delta":
                result = _receive_delta(host, vm, cycle, reader, body, acknowledge,
                                        applying)
            else:
                result = receive_initial(host, vm, cycle, reader)
        except Exception as e:
            host.store.finish_cycle(row, False, error=getattr(e, "message", None) or str(e))
            raise
        with host.store.unsynced():      # history (see staged.apply_staged)
            host.store.finish_cycle(row, True, reader.raw_bytes, reader.bytes_read,
                                    result.get("records", 0))
        return result


def receive_initial(host, vm: str, cycle: int, reader: wire.CycleReader) -> dict:
    """An initial copy (into emptied heads) or a resynchronisation (only the blocks that
    differ, onto what the heads hold): applied as it streams; the relationship stays in
    waiting_for_initial / resynchronizing until all of it is verified and applied."""
    rel = host.store.relationship(vm)
    assert reader.header is not None                # (started by the caller)
    resync = bool(reader.header.get("resync"))
    waiting = State.RESYNCHRONIZING.value if resync else State.WAITING_FOR_INITIAL.value
    if rel.state != waiting:
        host.store.set_state(vm, waiting)
    t0 = time.monotonic()
    heads = rstore.heads(rel.chains, rel.disks)
    host.store.update_relationship(vm, index_valid=False)
    if not resync:
        host.heads.close(vm)
        rstore.reset_heads(heads)
        for d, h in zip(rel.disks, heads, strict=False):
            rindex.init(rindex.path(Path(rel.storage), vm, d), int(img.info(h)["virtual-size"]))
    # Records are taken off the connection and verified on a thread of their own while
    # the previous ones are written: an initial copy streams gigabytes, and one thread
    # doing both left the primary's sends waiting while it waited on the head server.
    # (A reader waiting on the connection when the apply fails ends with the request.)
    records = ahead(reader.records(), depth=16, name="receive-ahead", join_timeout=2)
    stats = write_heads(host, vm, heads, records, bool(reader.header.get("verify")),
                        direct=True)
    host.store.update_relationship(vm, index_valid=True)
    record_applied(host, vm, cycle, reader.header, reader.trailer)
    # Staged deltas that could not be applied are superseded: the heads now hold the
    # primary's newer point whole.
    stale = host.store.staged(vm)
    for row in stale:
        Path(row["path"]).unlink(missing_ok=True)
        host.store.remove_staged(vm, row["cycle"])
    unapplied.clear(host, vm, [])
    host.event("resync" if resync else "initial",
               f"{'resynchronization' if resync else 'initial copy'} received: "
               f"{format_size(stats['bytes'])} in {stats['records']} records", vm)
    return {"vm": vm, "cycle": cycle, "applied": True, "records": stats["records"],
            "apply_seconds": round(time.monotonic() - t0, 4),
            **manifest_of(rel, stats)}


def _receive_delta(host, vm: str, cycle: int, reader: wire.CycleReader, body,
                   acknowledge: Callable[[dict], None] | None, applying: ExitStack) -> dict:
    sdir = host.home.staging / vm
    sdir.mkdir(parents=True, exist_ok=True)
    part = sdir / f"incoming-{cycle:08d}-{time.monotonic_ns()}.part"
    kept: list[wire.Record] | None = []
    t_start = time.monotonic()
    # While the stream comes in, the heads leave the page cache: whatever read them since
    # the last cycle (a backup, a compare, a test failover) would otherwise make this
    # cycle's writes 3-4x slower (qemutools.img.drop_cached_pages). Off this thread: it
    # costs up to 0.1 s for a head read whole, and the receive mostly waits on the primary.
    rel = host.store.relationship(vm)
    settle = img.drop_cached_pages_later(*rstore.heads(rel.chains, rel.disks),
                                         name=f"uncache-{vm}")
    try:
        with open(part, "wb") as f:
            # The staged file is the stream exactly as received: the header, then every
            # record as it is read and verified, then the end frame.
            f.write(reader.head_bytes)
            reader._read = _Tee(body.read, f.write).read
            for rec in reader.records():
                if kept is not None:
                    kept.append(rec)
                    if reader.raw_bytes > KEEP_IN_MEMORY:
                        kept = None  # too large to hold: apply from the staged file
            t_recv = time.monotonic()
            f.flush()
            os.fsync(f.fileno())
        final = sdir / f"cycle-{cycle:08d}.stage"
        os.replace(part, final)
        _fsync_dir(sdir)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        settle.join()
    host.store.add_staged(vm, cycle, str(final))
    t_staged = time.monotonic()
    # Checkpointed later (replica.checkpoint) unless the cycle makes a recovery point (a
    # point freezes the head as it is on disk) or is a planned failover's last; these
    # two and a verified cycle (its answer holds the heads' digests) are applied before
    # their ack, the others acknowledged now: staged durably, they survive a power cut.
    trailer = reader.trailer or {}
    assert reader.header is not None                # (started by the caller)
    durable = bool(trailer.get("point") or trailer.get("final") or reader.header.get("verify"))
    staged = {"vm": vm, "cycle": cycle, "records": trailer.get("records", 0),
              "receive_seconds": round(t_recv - t_start, 4),
              "stage_seconds": round(t_staged - t_recv, 4)}
    # A cycle too large to keep in memory (a catch-up after a long cut) is applied before
    # its ack too: the apply after an ack is what the VM's views wait for, so it is kept
    # short (KEEP_IN_MEMORY: 256 MiB, about a second).
    if acknowledge is not None and not durable and kept is not None and \
            _room_to_apply(rel.storage, reader.raw_bytes):
        applying.enter_context(host.applies.running(host.lock_key(vm)))
        try:
            acknowledge({**staged, "applied": False})
        except OSError as e:
            # The primary may not have it: it sends these changes again; applied anyway.
            log.info("the acknowledgement of %s cycle %d was not delivered: %s", vm, cycle, e)
    try:
        result = apply_staged(host, vm, cycle, final, kept, reader.trailer, reader.header,
                              durable=durable)
    except BaseException as e:  # noqa: BLE001 — re-raised, marked: whatever stopped the apply
        # The heads hold part of the cycle: nothing reads them until the staged copy has
        # been applied whole (unapplied.mark; the VM's lock redoes it first).
        raise unapplied.mark(host, vm, cycle, final, e) from None
    for rec in kept or ():
        POOL.put(rec.payload)      # applied and flushed: the next cycle's buffers
    return {**staged, "applied": True, **result,
            "apply_seconds": round(time.monotonic() - t_staged, 4)}


def _room_to_apply(storage: str, raw_bytes: int) -> bool:
    """Whether the replica's storage surely holds what applying ``raw_bytes`` allocates
    (every byte new, plus qcow2's tables). If not, the cycle is applied before its ack,
    so that a storage that fills up fails this cycle, at the primary too, and the
    primary keeps its changes (instead of hearing of it at its next cycle)."""
    free = unapplied.free_space(storage)
    return free is not None and free >= raw_bytes + raw_bytes // 32 + APPLY_MARGIN


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
