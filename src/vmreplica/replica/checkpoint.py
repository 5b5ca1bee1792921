"""Checkpoints: an acknowledged delta cycle's hash index and record made durable after the ack.

A delta cycle is acknowledged once it is staged durably (fsync, rename, directory fsync,
a synced row in the state store), applied into the heads and flushed: every reader of a
head sees it from then on. The head server keeps qcow2's flushes (heads.HeadServer), so
its metadata is consistent whatever a power cut leaves, and the apply's last flush has
made the heads' writes durable before the ack. What is left for here is the hash index
and the store's record of the apply: ``DELAY`` seconds after the ack or as soon as
anything else takes the VM's lock (the next cycle, a recovery point, a failover, a
removal, the daemon's shutdown), whichever comes first, the index files (and the heads)
are fdatasynced, a synced commit makes the "applied" row durable, then the staged cycle
is dropped. Until then a crash loses nothing: the staged copy is applied again at
start-up (recovery.recover), and applying twice gives the same bytes (invariant 1).
A failed sync is a crash, never retried (replica.unapplied).

Why after the ack: on a disk shared by the two hosts (this project's benchmark, a lab,
a host replicating to itself), every fsync flushes the whole disk's cache, so the
replica's syncs before the ack and the primary's own bookkeeping after it (its cycle
record, its bitmaps written as the storage daemon closes) pay for each other. Delayed,
the replica's run while nothing waits for them. (That was measured when the heads'
64 MiB of writes were synced here too; since issue 16 the apply's flush syncs them
before the ack: docs/durability.md says what that costs.)
"""

from __future__ import annotations

import logging
import os
import threading

from ..qemutools import img
from . import unapplied

log = logging.getLogger("vmreplica.replica")

DELAY = 1.0     # seconds from the ack to the checkpoint, at most


def delay() -> float:
    """``DELAY``, or ``VMREPLICA_CHECKPOINT_DELAY`` from the daemon's environment (the
    tests hold a checkpoint back to kill the daemon before it)."""
    try:
        return float(os.environ.get("VMREPLICA_CHECKPOINT_DELAY", DELAY))
    except ValueError:
        return DELAY


def defer(host, vm: str, cycle: int, stage, heads: list[str], index: list[str]) -> None:
    """Called under the VM's lock, after the apply: the ``heads`` and the hash ``index``
    files are synced, and ``stage`` dropped, later."""
    key = host.lock_key(vm)
    host.unsynced.setdefault(key, []).append((vm, cycle, str(stage), list(heads),
                                              list(index)))
    timer = threading.Timer(delay(), _settle_later, args=(host, key))
    timer.daemon = True
    timer.name = f"checkpoint-{key}"
    timer.start()


def _settle_later(host, key: str) -> None:
    try:
        with host.vm_lock(key):      # taking the lock settles (service.host.VMLock)
            pass
    except Exception:  # noqa: BLE001 — the stage stays; the next taker of the lock retries
        log.exception("checkpoint of %s failed", key)


def settle(host, key: str) -> None:
    """Under the VM's lock: sync what the VM's acknowledged cycles wrote, then drop their
    staged copies. A failure leaves them staged (raised to whoever took the lock)."""
    pending = host.unsynced.get(key)
    if not pending:
        return
    heads = list(dict.fromkeys(h for _, _, _, hs, _ in pending for h in hs))
    index = list(dict.fromkeys(f for _, _, _, _, fs in pending for f in fs))
    try:
        img.sync_files(*heads, *index)
    except OSError as e:
        # Linux reports a failed writeback once: the failed pages are then marked clean
        # while the disk holds the old data, and a second fdatasync returns 0. So a failed
        # sync is never retried: it is a crash. The stages stay, the VM is marked, and the
        # lock's redo (service.host.VMLock) applies them again with O_DIRECT writes,
        # synced, before anything reads the heads (replica.unapplied).
        del host.unsynced[key]
        vm, cycle, stage, _, _ = pending[-1]
        log.error("the checkpoint of %s failed (%s): its staged cycles are applied again", key, e)
        unapplied.mark(host, vm, cycle, stage, e)
        return
    for vm, cycle, stage, _, _ in pending:
        # A synced commit: the cycle's "applied" row, committed unsynced before it (see
        # staged.apply_staged), becomes durable with it.
        host.store.remove_staged(vm, cycle)
        try:
            os.unlink(stage)
        except FileNotFoundError:
            pass
    del host.unsynced[key]
    # Clean now: out of the page cache, so that a host holding many replicas does not
    # fill its memory with them.
    img.drop_cached_pages_later(*heads, name=f"uncache-{key}")


def settle_all(host) -> None:
    """The daemon stops: every VM's acknowledged cycles made durable."""
    for key in list(host.unsynced):
        try:
            with host.vm_lock(key):
                pass
        except Exception:  # noqa: BLE001 — staged: re-applied at the next start
            log.exception("checkpoint of %s failed at shutdown", key)
