"""Recovery points on the host that holds a VM's chains: make one (freeze the heads),
apply retention (merge the oldest away), list them, and finish a merge a crash cut short.

Callers hold the VM's lock. A point is the same layer index on every disk, so it is a
consistent point across the VM's disks (the cycle that made it was one freeze on the
primary).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..domain import points as dp
from ..domain.relationship import Relationship
from ..errors import NotFound, UsageError
from . import store as rstore

log = logging.getLogger("vmreplica.replica")


def _storage(rel: Relationship) -> Path:
    return Path(rel.storage)


def _set_chains(host, vm: str, chains: dict[str, list[str]], **changes) -> Relationship:
    rel = host.store.update_relationship(vm, chains=chains, **changes)
    follow_heads(host, vm, chains)
    return rel


def follow_heads(host, vm: str, chains: dict[str, list[str]]) -> None:
    """The replica VM's disks name its chains' heads — except an operator's existing
    libvirt domain (the replica side of a reverse, at the domain's own host): vmreplica
    never repoints its disks; it keeps its own disk (the chains' base) until a failover
    merges the chain into it (replica.failover, in place)."""
    if host.driver.inspect(vm).origin == "existing":
        return
    host.driver.set_disks(vm, {d: c[-1] for d, c in chains.items()})


def create(host, vm: str, kind: str, point_time: float, apply_retention: bool = True) -> dict:
    """Freeze the heads: the current contents become a recovery point."""
    rel = host.store.relationship(vm)
    target = host.mirror_targets.get(vm)
    if target is None:
        host.heads.close(vm)
    chains = rstore.freeze(_storage(rel), vm, rel.chains)
    if target is not None:
        # Continuous mode: the mirror writes on; freeze live, in one transaction.
        target.snapshot({d: c[-1] for d, c in chains.items()})
    layer = len(next(iter(rel.chains.values()))) - 1   # the old head's index
    point_id = rel.next_point_id
    # The new layer is in the chain file-wise (synced, name included); the point, the
    # chains and the end of a pending point are one commit. Apart, a power cut between
    # the point's row and the chains left a point naming the head (start-up's redo made
    # the point again: a duplicate id, the VM in error), and one between the chains and
    # the pending point's end made the point twice (tests/crashstates.py, rotation).
    with host.store.transaction():
        host.store.add_point(vm, point_id, point_time, kind, layer)
        _set_chains(host, vm, chains, next_point_id=point_id + 1, last_point_at=point_time,
                    points_count=len(host.store.points(vm)), pending_point=None)
    host.event("point", f"recovery point {point_id} ({kind}) made", vm)
    if apply_retention:
        retain(host, vm)
    return {"id": point_id, "kind": kind, "point_time": point_time}


def retain(host, vm: str) -> int:
    """Merge the oldest points away until at most ``history`` are left (not while a test
    failover or a failover uses the chain). Returns how many were merged."""
    rel = host.store.relationship(vm)
    pinned = bool(rel.test or rel.failover)
    merged = 0
    while True:
        pts = host.store.points(vm)
        if dp.merges_needed(len(pts), rel.history, pinned) == 0:
            return merged
        target = host.mirror_targets.get(vm)
        if target is None:
            host.heads.close(vm)
        # Durable intent first: a crash mid-merge is finished at start-up (finish_merges).
        host.store.update_relationship(vm, merging=True)
        if target is not None:
            target.merge_oldest()     # live block-commit; the mirror writes on
            chains = {d: list(c) for d, c in target.chains.items()}
        else:
            chains = rstore.merge_oldest(rel.chains)
        with host.store.transaction():
            host.store.replace_points(vm, dp.after_merge(pts))
            rel = _set_chains(host, vm, chains, merging=False,
                              points_count=len(host.store.points(vm)))
        host.event("point", f"recovery point {pts[0].id} merged into the base (retention)", vm)
        merged += 1


def finish_merges(host) -> None:
    """Start-up: a merge cut short by a crash is done again (it is idempotent)."""
    for rel in host.store.relationships():
        if rel.merging and rel.chains:
            log.warning("finishing an interrupted retention merge of %s", rel.vm)
            chains = rstore.merge_oldest(rel.chains)
            with host.store.transaction():
                host.store.replace_points(rel.vm, dp.after_merge(host.store.points(rel.vm)))
                _set_chains(host, rel.vm, chains, merging=False)


def listing(host, vm: str) -> list[dict]:
    """The VM's points on this host, oldest first, then ``latest`` (the head) if it
    receives cycles."""
    rel = host.store.relationship(vm)
    if rel is None or not rel.chains:
        raise NotFound(f"{host.name} holds no recovery points of {vm}")
    chains = rel.chains
    out = []
    for p in host.store.points(vm):
        size = sum(rstore.layer_size(c[p.layer]) for c in chains.values())
        out.append({"id": p.id, "time": p.point_time, "kind": p.kind, "size": size,
                    "host": host.name, "paths": layer_paths(rel, p.layer)})
    if rel.role == "replica" and rel.last_freeze_at and rel.state not in (
            "failover_in_progress", "failed_over"):
        size = sum(rstore.layer_size(c[-1]) for c in chains.values())
        out.append({"id": "latest", "time": rel.last_freeze_at, "kind": dp.LATEST,
                    "size": size, "host": host.name,
                    "paths": {d: c[-1] for d, c in chains.items()}})
    return out


def find(host, vm: str, point: str | int | None) -> dp.Point:
    """The point row for ``point`` (an id, or None / 'latest' for the newest point)."""
    pts = host.store.points(vm)
    if point in (None, "latest"):
        if not pts:
            raise UsageError(f"{vm} has no recovery point yet on {host.name}")
        return pts[-1]
    try:
        wanted = int(point)
    except (TypeError, ValueError):
        raise UsageError(f"invalid recovery point {point!r}", hint=f"see `vmreplica points {vm}`") from None
    for p in pts:
        if p.id == wanted:
            return p
    raise NotFound(f"{vm} has no recovery point {wanted} on {host.name}",
                   hint=f"`vmreplica points {vm}` lists them")


def layer_paths(rel: Relationship, layer: int) -> dict[str, str]:
    return {d: c[layer] for d, c in rel.chains.items()}
