"""A relationship's life on the replica, as its primary asks for it: create it (the
request's names and numbers checked, the primary authorized, a kept replica of the same
VM stepping aside), take a DR link over to another holder (``transfer``), change its
settings, mode or disks, make a recovery point or record the final marker in continuous
mode, and tell the primary its state. Its removal is replica.removal's; its cycles,
replica.receiver's.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..domain.networks import merged
from ..domain.patterns import find_authorization
from ..domain.reip import FailoverIP
from ..domain.relationship import DEFAULTS, Relationship
from ..domain.states import Role, State
from ..errors import Conflict, NotFound, Refused, UsageError
from . import checks, mirror, points, removal
from . import index as rindex
from . import store as rstore


def safe_name(value, what: str) -> str:
    """A VM or disk name the primary sent, fit to be one component of a path here: no
    separator, no NUL or control character, not ``.`` or ``..``, not empty, not huge."""
    if (not isinstance(value, str) or not value or len(value) > 128 or value in (".", "..")
            or value[0] == "-" or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in value)):
        raise UsageError(f"invalid {what} name {str(value)[:80]!r} from the primary",
                         hint="a name may not be empty, '.', '..' or hold '/', '\\' or "
                              "control characters")
    return value


def _field(body: dict, key: str, kind, default=None, *, low=None, high=None):
    """``body[key]`` (or ``default``) as ``kind``; a wrong type or range is a UsageError."""
    value = body.get(key, default)
    if value is None and default is None:
        return None
    try:
        if kind is int and (isinstance(value, bool) or not isinstance(value, (int, str))):
            raise TypeError
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
            raise TypeError
        out = kind(value)
        if kind is float and out != out or out in (float("inf"), float("-inf")):  # noqa: PLR0124 — NaN
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{key} must be {'an integer' if kind is int else 'a number'}, "
                         f"not {str(value)[:40]!r}") from None
    if (low is not None and out < low) or (high is not None and out > high):
        raise UsageError(f"{key} {out} is out of range")
    return out


_BIG = (1 << 63) - 1


def _check_create_body(body: dict) -> tuple[str, list[dict]]:
    """The VM name and disk list of a relationship request, checked before anything is
    created from them (a VM named ``../x`` created its chains outside the storage)."""
    vm = safe_name(body.get("vm", ""), "VM")
    if not isinstance(body.get("id"), str) or not body["id"]:
        raise UsageError("the relationship request has no id")
    desc = body.get("description") or {}
    if not isinstance(desc, dict):
        raise UsageError("the VM description must be a JSON object")
    disks = desc.get("disks") or []
    if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks):
        raise UsageError("the VM description's disks must be a list of objects")
    names = [safe_name(d.get("name"), "disk") for d in disks]
    if len(set(names)) != len(names):
        raise UsageError("the VM description names a disk twice")
    for d in disks:
        _field(d, "virtual_size", int, 0, low=1, high=1 << 55)
    for key in ("epoch", "frequency", "history", "point_interval"):
        _field(body, key, int, 1, low=0, high=_BIG)
    _field(body, "max_stall", float, DEFAULTS.max_stall, low=0)
    holders = body.get("holders")
    if holders is not None and not isinstance(holders, list):
        raise UsageError("holders must be a list of host names")
    for key in ("security_tag", "mode"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise UsageError(f"{key} must be a string")
    _failover_ips(body)
    return vm, disks


def _failover_ips(body: dict) -> list[dict]:
    """The failover IPs the primary sent (domain.reip), checked again here."""
    ips = body.get("failover_ips") or []
    if not isinstance(ips, list):
        raise UsageError("failover_ips must be a list")
    return [FailoverIP.from_dict(d).to_dict() for d in ips]


def create_relationship(host, peer: dict, body: dict) -> dict:
    settings = host.store.get_setting("replica_server") or {}
    vm = str(body.get("vm", ""))
    if not settings.get("enabled"):
        raise Refused(f"{host.name} is not a replica server",
                      hint=f"on {host.name} run `vmreplica replica-server enable --allow "
                           f"{peer['name']}`")
    entry = find_authorization(host.store.authorizations(), peer["name"])
    if entry is None:
        raise Refused(f"primary {peer['name']} is not authorized to replicate to {host.name}",
                      hint=f"on {host.name} run `vmreplica replica-server enable --allow "
                           f"{peer['name']}` (or a pattern that matches it)")
    tag = str(body.get("security_tag") or "")
    if entry["tag"] and entry["tag"] != tag:
        raise Refused(f"security tag mismatch: {host.name} allows {peer['name']} only with tag "
                      f"{entry['tag']!r}, the primary sent {tag!r}",
                      hint=f"enable replication with `--security-tag {entry['tag']}`")
    vm, _ = _check_create_body(body)
    existing = host.store.relationship(vm)
    if existing is not None:
        if existing.id == body.get("id") and existing.peer == peer["name"]:
            return _describe(host, existing)  # retried request: idempotent
        raise Conflict(f"{host.name} already holds a relationship for VM {vm} "
                       f"(with {existing.peer})",
                       hint=f"remove it on {host.name} with `vmreplica remove {vm}` first")
    desc = body.get("description") or {}
    disks = desc.get("disks") or []
    if not disks:
        raise UsageError("the relationship has no disks to replicate")
    # A VM of that name is refused, unless it is a kept replica of this same VM (`remove
    # --keep-replica`): it steps aside, its folder stays for `initial --method existing`.
    kept = removal.kept_replica(host, vm, desc.get("uuid"))
    storage = Path(entry["storage"] or settings.get("storage") or host.home.storage)
    if kept is not None:
        removal.release(host, vm, kept)
    try:
        chains = rstore.create_chains(storage, vm, disks)
    except Exception:
        if kept is not None:
            removal.redefine(host, kept)
        raise
    try:
        replica_desc = dict(desc)
        replica_desc["name"] = vm
        replica_desc["disks"] = [dict(d, path=chains[d["name"]][-1], format="qcow2")
                                 for d in disks]
        replica_desc["owns"] = [str(rstore.vm_dir(storage, vm))]
        if desc.get("definition"):      # the whole domain: its NICs on this host's networks
            replica_desc["network_map"] = merged(settings.get("network_map"),
                                                 desc.get("network_map"))
        notes = host.driver.define_vm(replica_desc).notes
        host.store.add_relationship(Relationship(
            vm=vm, id=body["id"], role=Role.REPLICA.value, peer=peer["name"],
            peer_address=peer.get("address"), state=State.WAITING_FOR_INITIAL.value,
            epoch=int(body.get("epoch", 1)), storage=str(storage),
            disks=[d["name"] for d in disks], chains=chains,
            frequency=int(body.get("frequency", DEFAULTS.frequency)), security_tag=tag,
            history=int(body.get("history", DEFAULTS.history)),
            point_interval=int(body.get("point_interval", DEFAULTS.point_interval)),
            # Kept so that after a reverse this side replicates the same way.
            mode=body.get("mode") or DEFAULTS.mode,
            max_stall=float(body.get("max_stall", DEFAULTS.max_stall)),
            cluster=bool(body.get("cluster")),
            # The hosts that may take this replication over when the VM moves to them (a
            # DR link: the primary and the partner of its main relationship).
            holders=[str(h) for h in body.get("holders") or [peer["name"]]],
            failover_ips=_failover_ips(body)))
    except Exception:
        try:
            host.driver.delete(vm)
        except Exception:  # noqa: BLE001
            pass
        rstore.delete_chains(storage, vm)
        if kept is not None:
            removal.redefine(host, kept)
        raise
    removal.forget(host, vm)             # a tombstone of an earlier relationship
    if kept is not None:
        host.driver.add_owned(vm, [str(kept)])      # removed with this replica from now on
    host.event("relationship", f"replica of {vm} created for primary {peer['name']}"
               + (f"; the kept replica in {kept} is ready for `initial {vm} --method existing "
                  f"--path {kept}`" if kept is not None else ""), vm)
    if notes:
        host.event("relationship", "replica VM defined from the primary's domain: "
                   + "; ".join(notes), vm)
    return {**_describe(host, host.store.relationship(vm)), "notes": notes}


def _describe(host, rel: Relationship) -> dict:
    return {"vm": rel.vm, "replica": host.name, "state": rel.state,
            "heads": {d: c[-1] for d, c in rel.chains.items()}}


def transfer(host, peer: dict, vm: str, body: dict) -> dict:
    """A DR link follows its VM: ``peer``, one of the relationship's holders, runs the VM
    now and takes the replication over. The epoch goes up, so the host it leaves is
    refused from now on (Superseded: it stands by); the new holder settles whatever is in
    doubt with a hash resync against this side's index. A replica that has failed over
    (the DR site runs the VM) refuses: nothing it holds is overwritten."""
    rel = host.store.relationship(vm)
    if rel is None or rel.role != Role.REPLICA.value:
        raise NotFound(f"{host.name} holds no replica of VM {vm}",
                       hint="enable the DR link again (`vmreplica dr enable`) from the host "
                            "that runs the VM")
    if body.get("id") and body["id"] != rel.id:
        raise Refused(f"{host.name}'s replica of {vm} belongs to another relationship")
    holders = rel.holders or [rel.peer]
    if peer["name"] not in holders:
        raise Refused(f"{peer['name']} may not take over the replication of {vm}: {host.name} "
                      f"accepts it only from {', '.join(holders)}")
    if find_authorization(host.store.authorizations(), peer["name"]) is None:
        raise Refused(f"primary {peer['name']} is not authorized to replicate to {host.name}",
                      hint=f"on {host.name} run `vmreplica replica-server enable --allow "
                           f"{peer['name']}`")
    if rel.state in (State.FAILOVER_IN_PROGRESS.value, State.FAILED_OVER.value) or \
            rel.failover:
        raise Conflict(f"{host.name} has failed VM {vm} over (state {rel.state}): it runs "
                       f"there, and {peer['name']} may not replicate over it",
                       hint=f"decide which copy lives: cancel the failover on {host.name} "
                            f"(`vmreplica failover {vm} --cancel`), or make {peer['name']}'s "
                            "copy the replica")
    if rel.peer != peer["name"]:
        old = rel.peer
        host.store.update_relationship(vm, peer=peer["name"], peer_address=peer.get("address"),
                                       epoch=rel.epoch + 1)
        rel = host.store.relationship(vm)
        host.event("dr", f"the replication of {vm} moved from {old} to {peer['name']} with "
                         f"the VM (epoch {rel.epoch}): {old} is refused from now on", vm)
    return {"vm": vm, "id": rel.id, "epoch": rel.epoch, "state": rel.state,
            "disks": rel.disks, "frequency": rel.frequency,
            "history": rel.history, "point_interval": rel.point_interval,
            "security_tag": rel.security_tag, "holders": holders,
            "last_applied_cycle": rel.last_applied_cycle}


SYNC_STATES = (None, "catching_up", "in_sync", "degraded", "idle")


def apply_settings(host, peer: dict, vm: str, body: dict) -> dict:
    """The primary changed settings that the replica applies (retention history, failover
    IPs), or tells it its replication mode and continuous sub-state (shown here as they
    are there)."""
    rel = checks.own_relationship(host, peer, vm)
    if "mode" in body:
        return _apply_mode(host, vm, body)
    ips = {"failover_ips": _failover_ips(body)} if "failover_ips" in body else {}
    if ips and "history" not in body and "point_interval" not in body:
        host.store.update_relationship(vm, **ips)
        return {"vm": vm, **ips}
    from ..domain import points as dp
    history = dp.validate_history(_field(body, "history", int, rel.history,
                                         high=_BIG))
    interval = _field(body, "point_interval", int, rel.point_interval, low=1,
                      high=_BIG)
    with host.vm_lock(vm):
        host.store.update_relationship(vm, history=history, point_interval=interval, **ips)
        if rel.state == State.REPLICATING.value:
            points.retain(host, vm)
    return {"vm": vm, "history": history, **ips}


def _apply_mode(host, vm: str, body: dict) -> dict:
    mode = body.get("mode")
    if mode not in ("periodic", "continuous"):
        raise UsageError(f"unknown mode {str(mode)[:20]!r}")
    sync = body.get("sync_state")
    if sync not in SYNC_STATES or (sync is not None and mode != "continuous"):
        raise UsageError(f"unknown continuous sub-state {str(sync)[:20]!r}")
    reason = body.get("sync_reason")
    if reason is not None and not isinstance(reason, str):
        raise UsageError("sync_reason must be a string")
    changes = {"mode": mode, "sync_state": sync, "sync_reason": reason and reason[:500],
               "sync_since": _field(body, "sync_since", float, None, low=0)}
    if body.get("max_stall") is not None:
        changes["max_stall"] = _field(body, "max_stall", float, DEFAULTS.max_stall, low=0.5,
                                      high=120)
    host.store.update_relationship(vm, **changes)
    return {"vm": vm, "mode": mode, "sync_state": sync}


def change_disks(host, peer: dict, vm: str, body: dict) -> dict:
    """The primary replicates another set of disks: drop the chains of the ones it no
    longer sends; give new ones an empty chain as deep as the others (so every recovery
    point is still the same layer on every disk; the new disk reads as zeros in older
    points, which predate its replication)."""
    rel = checks.own_relationship(host, peer, vm)
    wanted = body.get("disks") or []
    if not isinstance(wanted, list) or not all(isinstance(d, dict) for d in wanted):
        raise UsageError("disks must be a list of objects")
    names = [safe_name(d.get("name"), "disk") for d in wanted]
    if not names or len(set(names)) != len(names):
        raise UsageError("disks must name each replicated disk once")
    for d in wanted:
        if d["name"] not in rel.chains:
            _field(d, "virtual_size", int, 0, low=1, high=1 << 55)
    with host.vm_lock(vm):
        host.heads.close(vm)
        chains = dict(rel.chains)
        depth = len(next(iter(chains.values())))
        storage = Path(rel.storage)
        for d in wanted:
            if d["name"] not in chains:
                chains[d["name"]] = rstore.new_chain(storage, vm, d, depth)
        dropped = [p for name, c in chains.items() if name not in names for p in c]
        chains = {n: chains[n] for n in names}
        host.driver.replace_disks(vm, [dict(d, path=chains[d["name"]][-1], format="qcow2")
                                       for d in wanted])
        host.store.update_relationship(vm, chains=chains, disks=names, index_valid=False)
        rstore.drop_layers(dropped)
        for name in rel.disks:
            if name not in names:
                rindex.path(storage, vm, name).unlink(missing_ok=True)
    host.event("relationship", "replicated disks now: " + ", ".join(names), vm)
    return {"vm": vm, "disks": names}


def point_now(host, peer: dict, vm: str, body: dict) -> dict:
    """Continuous mode: make a recovery point of what the mirror has written so far."""
    rel = checks.own_relationship(host, peer, vm)
    checks.check_primary(host, rel, _field(body, "epoch", int, 0, high=_BIG))
    from ..domain import points as dp
    kind = body.get("kind") or dp.CRASH
    if kind not in (dp.CRASH, dp.APP):
        raise UsageError(f"unknown recovery point kind {str(kind)[:20]!r}")
    when = _field(body, "time", float, 0, low=0) or time.time()
    with host.vm_lock(vm):
        made = points.create(host, vm, kind, when)
        host.store.update_relationship(vm, last_freeze_at=when)
    return made


def final_marker(host, peer: dict, vm: str, body: dict) -> dict:
    """Continuous mode, planned failover: the primary's VM is off and every write it
    acknowledged reached this replica through the mirror — no final cycle needed."""
    rel = checks.own_relationship(host, peer, vm)
    checks.check_primary(host, rel, _field(body, "epoch", int, 0, high=_BIG))
    with host.vm_lock(vm):
        mirror.close_target(host, vm)
        host.store.update_relationship(
            vm, primary_prepared={"cycle": rel.last_applied_cycle,
                                  "at": time.time(), "mirror": True},
            last_freeze_at=time.time())
    host.event("failover", "the primary is prepared (continuous mode: every acknowledged "
                           "write is here)", vm)
    return {"vm": vm, "prepared": True}


def state_for_primary(host, peer: dict, vm: str, epoch: int) -> dict:
    rel = checks.own_relationship(host, peer, vm)
    checks.check_primary(host, rel, epoch)
    return {"vm": vm, "state": rel.state, "epoch": rel.epoch,
            "last_applied_cycle": rel.last_applied_cycle}
