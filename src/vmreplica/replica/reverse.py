"""The old primary's side of reverse replication: it becomes the replica of the host
that failed over, keeping its disks so that only the blocks that differ have to move.

Called by the new primary (which holds the higher epoch) over the replication API.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..domain.patterns import find_authorization
from ..domain.relationship import Relationship
from ..domain.states import Role, State
from ..errors import NotFound, Refused
from ..tracking import scan
from . import index as rindex
from . import points
from . import store as rstore

log = logging.getLogger("vmreplica.replica")


def become_replica(host, peer: dict, vm: str, body: dict) -> dict:
    rel = host.store.relationship(vm)
    if rel is None or rel.peer != peer["name"]:
        raise NotFound(f"{host.name} has no relationship of {vm} with {peer['name']}",
                       hint=f"enable replication from {peer['name']} instead")
    epoch = int(body.get("epoch", 0))
    if epoch <= rel.epoch and rel.role == Role.PRIMARY.value:
        raise Refused(f"reverse refused: {peer['name']}'s epoch {epoch} is not newer than "
                      f"{host.name}'s {rel.epoch}")
    settings = host.store.get_setting("replica_server") or {}
    entry = find_authorization(host.store.authorizations(), peer["name"])
    if not settings.get("enabled") or entry is None:
        raise Refused(f"{host.name} does not accept replication from {peer['name']}",
                      hint=f"on {host.name}: `vmreplica replica-server enable --allow "
                           f"{peer['name']}`")
    with host.vm_lock(vm):
        info = host.driver.inspect(vm)
        if info.state == "running":    # two copies on one network: this one goes
            host.driver.stop(vm, force=True)
            host.event("fence", f"powered off: {peer['name']} runs this VM now", vm)
        _drop_tracking(host, rel, info)
        # A memory state saved here (the cluster's `save` stop mode) belongs to disks that
        # are about to change: resuming it later would corrupt the guest.
        host.driver.discard_saved(vm)
        chains = rel.chains or {d.name: [d.path] for d in info.disks
                                if d.name in rel.disks}
        storage = Path(entry["storage"] or settings.get("storage") or host.home.storage)
        if info.origin == "vmreplica":
            # (an operator's existing domain owns nothing of vmreplica's: its replica
            # storage goes with the relationship, replica.removal)
            host.driver.add_owned(vm, [str(rstore.vm_dir(storage, vm))])
        host.store.set_state(
            vm, State.RESYNCHRONIZING.value, why=f"reverse: {peer['name']} is the primary now",
            id=str(body["id"]), role=Role.REPLICA.value,
            epoch=epoch, chains=chains, storage=str(storage), last_applied_cycle=-1,
            history=int(body.get("history", rel.history)),
            frequency=int(body.get("frequency", rel.frequency)),
            fenced=None, failover=None, test=None, bitmap=None, cycle=-1, last_error=None,
            consecutive_failures=0, primary_prepared=None, pending_point=None,
            index_valid=False,
            # Its failover IPs were the other site's addresses (this host was the
            # primary): a failback must not bring them here (primary.reverse clears them
            # on the other side too).
            failover_ips=[], reip=None)
        points.follow_heads(host, vm, chains)
    host.event("relationship", f"now the replica of {vm} (epoch {epoch}, primary "
                               f"{peer['name']}); resynchronizing the differences", vm)
    return {"vm": vm, "replica": host.name, "epoch": epoch}


def _drop_tracking(host, rel: Relationship, info) -> None:
    """The bitmaps this host kept as a primary are meaningless now: remove them."""
    from ..tracking.bitmap import bitmap_prefix
    if not rel.id:
        return
    prefix = bitmap_prefix(rel.id)
    with host.driver.block_session(rel.vm) as session:
        names = {b.name for d in rel.disks for b in session.bitmaps(d)
                 if b.name.startswith(prefix)}
        if names:
            session.release(rel.disks, sorted(names))


def manifest(host, peer: dict, vm: str, epoch: int, disks: list[str] | None = None) -> dict:
    """Block digests of every head (or of ``disks``: a delta cycle's scan-tracked disks),
    for the primary's resynchronisation or scan: from the hash index when it can be
    trusted (only blocks it marks unknown are read), else by reading the heads — which
    rebuilds the index (of every disk: the index is trusted for all or none)."""
    rel = host.store.relationship(vm)
    if rel is None or rel.role != Role.REPLICA.value or rel.peer != peer["name"]:
        raise NotFound(f"{host.name} holds no replica of {vm} from {peer['name']}")
    from .checks import check_primary
    check_primary(host, rel, epoch)
    unknown_disks = [d for d in disks or [] if d not in rel.disks]
    if unknown_disks:
        raise NotFound(f"the replica of {vm} on {host.name} has no disk {unknown_disks[0]}")
    wanted = rel.disks if disks is None or not rel.index_valid else \
        [d for d in rel.disks if d in disks]
    out, read_bytes = {}, 0
    with host.vm_lock(vm):
        # A resync means the primary's mirror is gone (its QEMU died, say): a mirror
        # target left open holds the heads, and no head server could open them.
        from . import mirror
        mirror.close_target(host, vm)
        # (a resync follows: its writes go direct; a delta's scan is followed by a delta)
        server = host.heads.get(vm, rstore.heads(rel.chains, rel.disks), direct=disks is None)
        for i, d in enumerate(rel.disks):
            if d not in wanted:
                continue
            p = rindex.path(Path(rel.storage), vm, d)
            size = server.writers[i].size
            digests = rindex.read(p) if rel.index_valid and p.exists() else b""
            if len(digests) != (size + scan.BLOCK - 1) // scan.BLOCK * scan.DIGEST:
                digests = server.manifest(i)
                read_bytes += size
                rindex.write(p, digests)
            else:
                unknown = rindex.unknown_blocks(digests)
                if unknown:
                    digests = server.fill_unknown(i, digests, unknown)
                    read_bytes += len(unknown) * scan.BLOCK
                    rindex.write(p, digests)
            if disks is None or d in disks:
                out[d] = scan.encode(digests)
        host.store.update_relationship(vm, index_valid=True)
    return {"block": scan.BLOCK, "disks": out, "read_bytes": read_bytes}
