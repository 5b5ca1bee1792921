"""Applying staged cycles again: at start-up, and after a failed apply or checkpoint.

At start-up every staged cycle still listed is applied again, VM by VM, before the
daemon serves anything (``recover``; invariant 1: no torn head); a VM whose recovery
fails stays in ``error`` (or, when its storage is full, marked with its stage kept) and
the others start regardless. The VM's lock (service.host.VMLock) calls
``redo_unapplied`` before it lets anything read heads that hold part of a cycle
(replica.unapplied). A redo is handled as a crash: heads closed, out of the page cache,
checked and repaired by ``qemu-img check``, then every staged cycle written whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..domain.states import Role, State
from ..qemutools import img
from . import points, unapplied
from . import store as rstore
from .staged import apply_staged, make_pending_point

log = logging.getLogger("vmreplica.replica")


def recover(host) -> list[tuple[str, int]]:
    """Start-up: re-apply every cycle that was staged but not checkpointed, VM by VM. A VM
    whose recovery fails is left in ``error`` with its reason (or, when its storage is
    full, with its stage kept for a later redo): the others start regardless."""
    redone = []
    vms = list(dict.fromkeys(row["vm"] for row in host.store.staged()))
    for vm in vms:
        if host.store.relationship(vm) is None:
            for row in host.store.staged(vm):
                Path(row["path"]).unlink(missing_ok=True)
                host.store.remove_staged(vm, row["cycle"])
            continue
        try:
            redone += [(vm, c) for c in redo_unapplied(host, vm, at_start=True)]
        except Exception as e:  # noqa: BLE001 — one VM's failure stops no other
            log.exception("start-up recovery of %s failed", vm)
            unapplied.failed_at_start(host, vm, e)
    for rel in host.store.relationships():
        if rel.apply_pending:
            host.unapplied.add(host.lock_key(rel.vm))
    _reconcile_disks(host)
    try:
        points.finish_merges(host)
    except Exception:  # noqa: BLE001
        log.exception("finishing interrupted merges failed")
    for rel in host.store.relationships():
        if rel.pending_point and rel.vm not in host.unapplied:
            try:
                make_pending_point(host, rel.vm)
            except Exception as e:  # noqa: BLE001
                log.exception("the pending recovery point of %s failed", rel.vm)
                host.event("recovery", f"the recovery point recorded with the last cycle "
                                       f"could not be made: {e}", rel.vm)
    # Leftover partial uploads were never acknowledged: drop them.
    if host.home.staging.exists():
        for part in host.home.staging.glob("*/*.part"):
            part.unlink(missing_ok=True)
    return redone


def _reconcile_disks(host) -> None:
    """Start-up: every replica VM's disks point at its chains' heads. The state store's
    chains are the truth (committed with the point that changed them); the VM's own
    definition is written after that commit (the qemu driver's vm.json, libvirt's domain
    XML), so a power cut in between left it naming a frozen layer (found by the crash
    states of a recovery point's rotation): a later `remove --keep-replica` would then
    have kept the point and lost every cycle after it."""
    for rel in host.store.relationships():
        if rel.role != Role.REPLICA.value or not rel.chains or rel.failover \
                or rel.state == State.FAILED_OVER.value:
            continue
        vm = rel.vm
        want = {d: c[-1] for d, c in rel.chains.items()}
        try:
            info = host.driver.inspect(vm)
            have = {d.name: d.path for d in info.disks}
            wrong = {d: p for d, p in want.items() if d in have and have[d] != p}
            if wrong and info.origin == "vmreplica":    # (points.follow_heads)
                host.driver.set_disks(vm, wrong)
                host.event("recovery", "the replica VM's disks named older layers after an "
                                       "unclean stop; they point at the heads again: " +
                           ", ".join(f"{d} -> {p}" for d, p in wrong.items()), vm)
        except Exception as e:  # noqa: BLE001 — one VM's trouble stops no other
            log.warning("could not check the disks of replica VM %s: %s", vm, e)


def redo_unapplied(host, vm: str, at_start: bool = False) -> list[int]:
    """Apply every staged cycle of ``vm`` again, whole, as after a crash (replica.unapplied):
    heads closed, dropped from the page cache, repaired, then each cycle written with
    O_DIRECT and synced before it is recorded. Under the VM's lock, or at start-up.
    Returns the cycles applied; raises when one fails (its stage stays, the VM stays
    marked). Stage files that went missing make the relationship need a resync."""
    rows = host.store.staged(vm)
    if any(not Path(r["path"]).exists() for r in rows):
        # A later cycle cannot be applied over a lost one: the resync covers them all.
        for r in rows:
            Path(r["path"]).unlink(missing_ok=True)
        unapplied.lost(host, vm, [r["cycle"] for r in rows])
        unapplied.clear(host, vm, [])
        return []
    if not rows:
        unapplied.clear(host, vm, [])
        return []
    rel = host.store.relationship(vm)
    host.heads.close(vm)
    img.drop_cached_pages(*rstore.heads(rel.chains, rel.disks))
    repair_heads(host, vm)
    done = []
    for row in rows:
        log.warning("re-applying staged cycle %s of %s (%s)", row["cycle"], vm,
                    "after a restart" if at_start else "after a failed apply or checkpoint")
        apply_staged(host, vm, row["cycle"], Path(row["path"]), durable=True, direct=True)
        done.append(row["cycle"])
    host.event("recovery", f"re-applied staged cycle{'s' if len(done) > 1 else ''} "
                           f"{', '.join(map(str, done))} "
                           f"{'after a restart' if at_start else 'after a failed apply or sync'}",
               vm)
    unapplied.clear(host, vm, done)
    return done


def repair_heads(host, vm: str) -> None:
    """Before a staged cycle is applied again (at start-up, or after a failed apply or
    checkpoint): the heads' qcow2 metadata checked and made consistent. The head server
    keeps qcow2's flushes, so qcow2's own write ordering holds whatever a power cut left
    (heads.HeadServer); ``qemu-img check -r all`` then only frees leaked clusters (and
    would rebuild refcounts left behind an L2 entry). What the tables lost (a new
    cluster or L2 table not on the disk) reads from the layer below until the re-apply,
    which writes every extent of the cycle again. A head ``qemu-img check`` cannot
    repair raises (HypervisorError): that VM goes to ``error``."""
    rel = host.store.relationship(vm)
    host.heads.close(vm)
    for head in rstore.heads(rel.chains, rel.disks):
        report = img.repair(head)
        fixed = int(report.get("corruptions-fixed", 0)) + int(report.get("leaks-fixed", 0))
        if fixed:
            host.event("recovery", f"{head}: qemu-img check repaired {fixed} refcount "
                                   "error(s) left by an unclean stop", vm)
