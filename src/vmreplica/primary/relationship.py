"""Primary-side relationship operations: enable, initial, sync, suspend, resume, remove, status."""

from __future__ import annotations

import time
import uuid

from ..domain import points as dp
from ..domain.config import digest
from ..domain.links import dr_key, vm_name
from ..domain.networks import parse_network_map
from ..domain.reip import format_failover_ips, parse_failover_ips, resolve
from ..domain.relationship import (
    DEFAULTS,
    FREQUENCY_TEXT,
    POINT_INTERVAL_TEXT,
)
from ..domain.schedule import format_frequency, parse_frequency, parse_window
from ..domain.states import Role, State, check_transition, suspend_allowed
from ..errors import (
    Conflict,
    NotFound,
    Refused,
    Superseded,
    Unreachable,
    UsageError,
)
from ..hypervisor.base import Origin
from .common import (
    COMPRESSIONS,
    check_disk,
    check_mirrorable,
    check_mode,
    primary_row,
    relationship_of,
)
from .follow import cycle
from .standing import check_peer, end_here, end_removed


def enable(host, vm: str, replica: str, frequency: str = FREQUENCY_TEXT,
           compression: str = DEFAULTS.compression, exclude_disks: list[str] | None = None,
           security_tag: str = DEFAULTS.security_tag, history: int = DEFAULTS.history,
           point_interval: str = POINT_INTERVAL_TEXT, app_every: int = DEFAULTS.app_every,
           resync_window: str | None = DEFAULTS.resync_window, mode: str = DEFAULTS.mode,
           max_stall: float = DEFAULTS.max_stall, cluster: bool = False,
           dr: bool = False, network_map: list[str] | None = None,
           failover_ips: list[str] | None = None) -> dict:
    """Replicate ``vm`` to ``replica`` (its main relationship), or with ``dr`` as its
    disaster-recovery link (key NAME@dr, periodic; see domain.links): then the partner of
    the main relationship, if any, may take the link over when the VM moves there.
    ``failover_ips``: ``--failover-ip`` entries (domain.reip), checked against the VM's
    NICs here, before anything is created."""
    info = host.driver.inspect(vm)  # NotFound with a clear message
    key = dr_key(vm) if dr else vm
    existing = host.store.relationship(key)
    if existing is not None:
        where = "to " + existing.peer if existing.role == "primary" else "from " + existing.peer
        raise Conflict(f"VM {vm} is already replicated {where} (state {existing.state})"
                       + (" by its DR link" if dr else ""),
                       hint=f"use `vmreplica set {key}` to change it, or `vmreplica remove "
                            f"{key}` first")
    main = host.store.relationship(vm) if dr else None
    if dr:
        from .dr import holders_for
        holders = holders_for(host, vm, main, mode)
    else:
        holders = [host.name]
    freq = parse_frequency(frequency)
    history = dp.validate_history(history)
    interval = dp.parse_interval(point_interval)
    if int(app_every) < 0:
        raise UsageError("--app-consistent-every must be 0 (never) or more")
    parse_window(resync_window)
    nets = parse_network_map(network_map)
    reip = resolve(parse_failover_ips(failover_ips), info.nics, vm)
    ips = [ip.to_dict() for ip in reip]
    check_mode(host, mode, max_stall)
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compression!r}", hint="choose zstd or none")
    names = [d.name for d in info.disks]
    exclude = list(exclude_disks or [])
    for name in exclude:
        if name not in names:
            raise UsageError(f"VM {vm} has no disk {name!r} to exclude",
                             hint=f"its disks are {', '.join(names)}")
    disks = [d for d in info.disks if d.name not in exclude]
    if not disks:
        raise UsageError(f"every disk of {vm} is excluded: nothing to replicate")
    for d in disks:
        check_disk(vm, d, existing=info.origin == Origin.EXISTING)
    how = host.driver.disk_tracking(vm)       # (status shows it from now on)
    if mode == "continuous":
        check_mirrorable(vm, how, [d.name for d in disks])
    desc = host.driver.describe(vm)
    desc["disks"] = [{"name": d.name, "format": d.format, "virtual_size": d.virtual_size}
                     for d in disks]
    if nets and not desc.get("definition"):
        raise UsageError(f"{vm} was made by vmreplica: its replica has no NICs to map",
                         hint="--network-map is for existing libvirt domains")
    if nets:
        desc["network_map"] = nets
    if reip and not desc.get("definition"):
        raise UsageError(f"{vm} was made by vmreplica: its replica has no NICs to re-IP",
                         hint="--failover-ip is for existing libvirt domains")
    client = host.client_for_address(replica)  # NotTrusted if not paired
    peer = host.store.peer_by_address(f"{client.host}:{client.port}")
    if main is not None:
        from .dr import tell_partner
        tell_partner(host, vm, main, peer)
    rel_id = uuid.uuid4().hex
    answer = client.request("POST", "/v1/replica/relationships", {
        "vm": vm, "id": rel_id, "epoch": 1, "security_tag": security_tag,
        "frequency": freq, "description": desc, "history": history,
        "point_interval": interval, "mode": mode, "max_stall": float(max_stall),
        "cluster": cluster, "holders": holders, "failover_ips": ips,
    })
    rel = primary_row(key, rel_id, peer, State.READY_FOR_INITIAL, 1, [d.name for d in disks],
                      disk_tracking={d.name: how[d.name] for d in disks if d.name in how},
                      frequency=freq, compression=compression, excluded=exclude,
                      security_tag=security_tag, history=history, point_interval=interval,
                      app_every=int(app_every), resync_window=resync_window or None,
                      mode=mode, max_stall=float(max_stall), cluster=cluster, holders=holders,
                      failover_ips=ips,
                      # (an existing domain's configuration as sent: primary.follow)
                      definition_digest=digest(desc["definition"])
                      if desc.get("definition") else None,
                      disk_sizes={d.name: d.virtual_size for d in disks},
                      disk_paths={d.name: d.path for d in disks})
    try:
        host.store.add_relationship(rel)
    except Exception:
        client.request("DELETE", f"/v1/replica/relationships/{vm}")
        raise
    host.event("relationship", f"{'DR link' if dr else 'replication'} enabled to "
                               f"{peer['name']} every {format_frequency(freq)}"
               + (f" (it follows the VM to {', '.join(holders[1:])})" if holders[1:] else "")
               + (f"; failover IPs {format_failover_ips(reip)}" if reip else ""), key)
    return {"vm": key, "replica": peer["name"], "state": rel.state, "holders": holders,
            "replica_heads": answer.get("heads"), "notes": answer.get("notes") or [],
            "next": f"vmreplica initial {key}"}


def sync(host, vm: str, verify: bool = False) -> dict:
    rel = relationship_of(host, vm)
    if rel.state == State.INITIAL_IN_PROGRESS.value and rel.seed:
        from .seeding import imported
        if not imported(host, vm, check_peer(host, vm)):
            raise Conflict(f"{vm} waits for its seed to be imported on {rel.peer}",
                           hint=f"on {rel.peer}: vmreplica initial {vm} --import DIR")
        rel = relationship_of(host, vm)
    if rel.state not in (State.REPLICATING.value, State.ERROR.value):
        hint = {
            State.READY_FOR_INITIAL.value: f"run `vmreplica initial {vm}` first",
            State.SUSPENDED.value: f"resume it with `vmreplica resume {vm}`",
            State.RESYNC_REQUIRED.value: "change tracking was broken: a resynchronization is required",
        }.get(rel.state)
        raise Conflict(f"{vm} cannot sync in state {rel.state}", hint=hint)
    stats = cycle(host, vm, verify=verify)      # (an existing domain's configuration first)
    if rel.state == State.ERROR.value and not stats.get("deferred"):
        host.store.set_state(vm, State.REPLICATING.value)
    return stats


def suspend(host, vm: str) -> dict:
    rel = relationship_of(host, vm)
    if not suspend_allowed(rel.state):
        raise Conflict(f"{vm} cannot be suspended in state {rel.state}")
    host.store.set_state(vm, State.SUSPENDED.value, suspended_from=rel.state)
    host.event("relationship", "replication suspended (changes are still tracked)", vm)
    return {"vm": vm, "state": State.SUSPENDED.value}


def resume(host, vm: str) -> dict:
    rel = relationship_of(host, vm)
    if rel.state != State.SUSPENDED.value:
        raise Conflict(f"{vm} is not suspended (state {rel.state})")
    back = rel.suspended_from or State.REPLICATING.value
    if back == State.SUSPENDED.value:
        back = State.REPLICATING.value
    check_transition(State.SUSPENDED, back)
    # A cycle at once, and health judges the slots from now on (not the suspension).
    host.store.set_state(vm, back, last_attempt_at=None, schedule_since=time.time())
    host.event("relationship", "replication resumed", vm)
    return {"vm": vm, "state": back}


def remove(host, vm: str, keep_replica: bool = False, force: bool = False) -> dict:
    """`remove VM` on the primary: its replica's side ends first (unless ``force`` and it
    cannot be reached), then this one. (Run on a replica, `remove` is the replica's:
    service.operations.remove chooses.)"""
    rel = relationship_of(host, vm)
    if rel.mode == "continuous":
        host.continuous.stop(vm)            # the mirror ends before the replica goes
    remote = "removed"
    answer: dict = {}
    try:
        if rel.state == State.STANDBY.value:
            raise Superseded("another host holds this DR link now")
        q = "?keep=1" if keep_replica else ""
        answer = host.client_for_peer(rel.peer, timeout=120).request(
            "DELETE", f"/v1/replica/relationships/{vm_name(vm)}{q}")
        if answer.get("already"):
            remote = "already gone"
    except NotFound:
        remote = "already gone"
    except Superseded:
        remote = "held by another host: kept"      # a DR link the VM took elsewhere
    except Unreachable as e:
        if not force:
            raise Unreachable(e.message, hint=f"nothing was removed; retry when {rel.peer} is "
                              "back, or use --force to remove it here only (then run `vmreplica "
                              f"remove {vm}` on {rel.peer})") from None
        remote = "unreachable: not removed there"
    with host.vm_lock(vm):
        end_here(host, vm, rel)
    host.event("relationship", f"replication removed (replica: {remote})", vm)
    return {"vm": vm, "replica": rel.peer, "replica_side": remote,
            "kept_copy": answer.get("kept_copy")}


def removed_by_replica(host, peer: dict, vm: str, body: dict) -> dict:
    """The replica ``peer`` runs `remove` and tells this host, its primary, first: this
    side ends as `remove` here would end it (it does not call the replica back)."""
    from ..domain.links import dr_key
    rel_id = body.get("id")
    found = None
    for key in (vm, dr_key(vm)):
        rel = host.store.relationship(key)
        if rel is not None and rel.role == Role.PRIMARY.value and rel.peer == peer["name"]:
            found = rel
            break
    if found is None:
        raise NotFound(f"{host.name} does not replicate {vm} to {peer['name']}")
    if rel_id and found.id != rel_id:
        raise Refused(f"{host.name} replicates {vm} to {peer['name']} in another relationship "
                      f"({found.id[:8]}, not {str(rel_id)[:8]})")
    end_removed(host, found.vm, found.id, peer["name"])
    return {"vm": found.vm, "removed": True}


