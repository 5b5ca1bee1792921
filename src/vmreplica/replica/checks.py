"""The checks every request from a primary passes on the replica: whether the relationship
is this peer's to act on (``own_relationship``), whether the peer still is its primary
(``check_primary``: epochs, failover), whether a cycle's header fits (``check_header``).
Used by the intake of a cycle (receiver), a relationship's requests (lifecycle), the
mirror target, seeding and reverse alike."""

from __future__ import annotations

from ..domain.relationship import Relationship
from ..domain.states import Role, State
from ..errors import IntegrityError, NotFound, Refused, Superseded, TrackingError


def own_relationship(host, peer: dict, vm: str) -> Relationship:
    """The replica relationship of ``vm`` that ``peer``, its primary, may act on: NotFound
    if there is none, Superseded if the DR link moved with the VM to another holder,
    Refused if another host is its primary."""
    rel = host.store.relationship(vm)
    if rel is None or rel.role != Role.REPLICA.value:
        raise NotFound(f"{host.name} holds no replica of VM {vm}",
                       hint="enable replication again from the primary")
    if rel.peer != peer["name"]:
        if peer["name"] in rel.holders:
            raise Superseded(f"{host.name} replicates {vm} from {rel.peer} now (epoch "
                             f"{rel.epoch}): the DR link moved with the VM",
                             hint=f"{peer['name']} stands by; it takes the link back when the "
                                  f"VM returns (`vmreplica dr adopt {vm}`)")
        raise Refused(f"{host.name} replicates {vm} from {rel.peer}, not from {peer['name']}")
    return rel


def check_primary(host, rel: Relationship, epoch: int) -> None:
    """Superseded if the caller (at ``epoch``) is no longer the primary of this VM."""
    if rel.state in (State.FAILOVER_IN_PROGRESS.value, State.FAILED_OVER.value):
        raise Superseded(f"{host.name} has taken over VM {rel.vm} (failover, state "
                         f"{rel.state}): it accepts no more cycles from {rel.peer}",
                         hint=f"{rel.peer} is no longer the primary; make it the replica "
                              f"with `vmreplica reverse {rel.vm}` on {host.name}")
    if epoch < rel.epoch:
        raise Superseded(f"cycle refused: epoch {epoch} is older than {host.name}'s "
                         f"{rel.epoch} (another host has become the primary of this VM)",
                         hint="this host is no longer the primary; see `vmreplica status`")


def check_header(host, rel: Relationship, header: dict) -> int:
    """The cycle number of a cycle's header, once the header is found to belong here:
    this relationship, its current primary, the next cycle, the same disks."""
    check_primary(host, rel, int(header.get("epoch", 0)))
    if header.get("relationship") != rel.id:
        raise Refused(f"cycle refused: it belongs to another relationship of {rel.vm}")
    cycle = int(header.get("cycle", -1))
    last = rel.last_applied_cycle
    if cycle < last:
        raise Refused(f"cycle {cycle} is older than the last applied cycle {last}")
    if not (header.get("initial") or header.get("resync")) and last < 0:
        raise Refused(f"cycle {cycle} refused: the initial copy has not been received",
                      hint="run `vmreplica initial VM` on the primary")
    if not (header.get("initial") or header.get("resync")) and \
            rel.state == State.RESYNC_REQUIRED.value:
        # The replica lost what it had acknowledged (replica.unapplied.lost): a delta on
        # top would hide it. The primary's change tracking cannot cover it: resync.
        raise TrackingError(rel.resync_reason or
                            f"{host.name} needs a resynchronization of {rel.vm}",
                            hint="the primary resynchronizes (`vmreplica resync VM`)")
    if list(header.get("disks", [])) != list(rel.disks):
        raise IntegrityError("cycle refused: its disk list does not match the replica's")
    return cycle
