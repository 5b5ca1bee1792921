"""Relationship operations as both front ends run them — the management API's routes
(service.api.management) and the dashboard's actions (web.actions) — and the ones that
span the two sides of a relationship, composed here: primary/ and replica/ never import
each other.

- ``remove``: on a replica, the replica's removal (it tells its primary first); on a
  primary, the primary's (its replica's side ends first).
- ``reverse``: on the host that failed over, the failed-over VM's chain is merged out of
  the replica storage into plain disks (replica.collapse), then this host becomes the
  primary (primary.reverse). cluster.ops composes the same for Pacemaker's takeovers.
"""

from __future__ import annotations

from ..domain.states import Role
from ..primary import relationship as prim
from ..primary import reverse as preverse
from ..primary.common import relationship_of
from ..replica import collapse, removal


def sync(host, vm: str, verify: bool = False) -> dict:
    return prim.sync(host, vm, verify=verify)


def suspend(host, vm: str) -> dict:
    return prim.suspend(host, vm)


def resume(host, vm: str) -> dict:
    return prim.resume(host, vm)


def remove(host, vm: str, keep_replica: bool = False, force: bool = False) -> dict:
    rel = relationship_of(host, vm, role="")     # the clear "not replicated" error
    collapse.ensure(host, vm)       # a failed-over VM's chain: merged, its layers gone
    if rel.role == Role.REPLICA.value:
        # Run on the replica: it tells the primary first (or keeps a tombstone for it).
        return removal.remove_relationship(host, vm, keep_replica, tell_primary=True)
    return prim.remove(host, vm, keep_replica=keep_replica, force=force)


def reverse(host, vm: str) -> dict:
    preverse.check(host, vm)
    # The failed-over VM runs on plain disks of its own before it is replicated from.
    collapse.ensure(host, vm)
    return preverse.reverse(host, vm)


def cluster_status(host) -> dict:
    from ..cluster.status import cluster_status
    return cluster_status(host)
