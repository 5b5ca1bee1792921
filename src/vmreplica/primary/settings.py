"""`set VM...`: change how existing relationships replicate, without re-seeding: frequency,
recovery history and interval, app-consistent cadence, compression, resync window,
failover IPs. History and failover IPs go to the replica too (its retention applies
the history at the next point; its failovers, the IPs)."""

from __future__ import annotations

import time

from ..domain import points as dp
from ..domain.links import vm_name
from ..domain.reip import format_failover_ips, parse_failover_ips, resolve
from ..domain.schedule import format_frequency, parse_frequency, parse_window
from ..errors import UsageError
from ..hypervisor.base import Origin
from .common import COMPRESSIONS, check_disk, check_mirrorable, check_mode, relationship_of

FIELDS = ("frequency", "history", "point_interval", "app_every", "compression",
          "resync_window", "mode", "max_stall", "failover_ips")


def validate(changes: dict) -> dict:
    out: dict = {}
    for key, value in changes.items():
        if value is None:
            continue
        if key == "frequency":
            out[key] = parse_frequency(value)
        elif key == "history":
            out[key] = dp.validate_history(int(value))
        elif key == "point_interval":
            out[key] = dp.parse_interval(value)
        elif key == "app_every":
            if int(value) < 0:
                raise UsageError("--app-consistent-every must be 0 or more")
            out[key] = int(value)
        elif key == "compression":
            if value not in COMPRESSIONS:
                raise UsageError(f"unknown compression {value!r}", hint="choose zstd or none")
            out[key] = value
        elif key == "mode":
            if value not in ("periodic", "continuous"):
                raise UsageError(f"unknown mode {value!r}", hint="choose periodic or continuous")
            out[key] = value
        elif key == "max_stall":
            if not 0.5 <= float(value) <= 120:
                raise UsageError("--max-stall must be between 0.5 and 120 seconds")
            out[key] = float(value)
        elif key == "failover_ips":
            if not isinstance(value, list):
                raise UsageError("failover_ips must be a list of NIC=ADDR/PREFIX[,...] entries")
            out[key] = parse_failover_ips(value)    # resolved against the VM's NICs by apply
        elif key == "resync_window":
            out[key] = None if value in ("", "none", "always") else value
            parse_window(out[key])
        else:
            raise UsageError(f"cannot set {key!r}")
    if not out:
        raise UsageError("nothing to change", hint="give at least one option, e.g. --frequency 5m")
    return out


def change_disks(host, vm: str, exclude: list[str], include: list[str]) -> dict:
    """Stop replicating some disks, or start replicating more (those get their data by a
    resynchronisation: the disks already replicated match and move nothing)."""
    from ..domain.states import State
    from ..tracking.bitmap import bitmap_prefix
    rel = relationship_of(host, vm)
    info = host.driver.inspect(vm)
    by_name = {d.name: d for d in info.disks}
    disks = list(rel.disks)
    for name in exclude + include:
        if name not in by_name:
            raise UsageError(f"VM {vm} has no disk {name!r}", hint=f"its disks are "
                             f"{', '.join(by_name)}")
    for name in exclude:
        if name not in disks:
            raise UsageError(f"disk {name} of {vm} is not replicated")
        disks.remove(name)
    for name in include:
        if name in disks:
            raise UsageError(f"disk {name} of {vm} is already replicated")
        check_disk(vm, by_name[name], existing=info.origin == Origin.EXISTING)
    if include and rel.mode == "continuous":
        check_mirrorable(vm, host.driver.disk_tracking(vm), include)
    order = [d.name for d in info.disks]
    disks = sorted(disks + include, key=order.index)
    if not disks:
        raise UsageError(f"every disk of {vm} would be excluded: use `vmreplica remove {vm}`")
    with host.vm_lock(vm):
        desc = host.driver.describe(vm)
        host.client_for_peer(rel.peer, timeout=120).request(
            "POST", f"/v1/replica/relationships/{vm}/disks",
            {"disks": [d for d in desc["disks"] if d["name"] in disks]})
        if exclude:
            with host.driver.block_session(vm) as session:
                names = {b.name for d in exclude for b in session.bitmaps(d)
                         if b.name.startswith(bitmap_prefix(rel.id))}
                # Where a bitmap spans disks (libvirt checkpoints) it goes with the next
                # cycle's release instead.
                if names and session.per_disk_bitmaps:
                    session.release(exclude, sorted(names))
        changes = {"disks": disks,
                   "excluded": [d for d in order if d not in disks]}
        if include:
            host.store.set_state(vm, State.RESYNC_REQUIRED,
                                 resync_reason=f"disk(s) {', '.join(include)} added",
                                 **changes)
        else:
            host.store.update_relationship(vm, **changes)
    host.event("relationship", "replicated disks now: " + ", ".join(disks), vm)
    return {"vm": vm, "disks": ", ".join(disks)}


def apply(host, vm: str, changes: dict) -> dict:
    rel = relationship_of(host, vm)
    changes = dict(changes)
    if "failover_ips" in changes:        # checked against the VM's NICs before any change
        ips = resolve(changes["failover_ips"], host.driver.inspect(vm_name(vm)).nics, vm)
        if ips and not host.driver.describe(vm_name(vm)).get("definition"):
            raise UsageError(f"{vm} was made by vmreplica: its replica has no NICs to re-IP",
                             hint="--failover-ip is for existing libvirt domains")
        changes["failover_ips"] = [ip.to_dict() for ip in ips]
    if changes.get("mode") == "continuous" and rel.mode != "continuous":
        check_mode(host, "continuous", changes.get("max_stall", rel.max_stall))
        check_mirrorable(vm, host.driver.disk_tracking(vm_name(vm)), rel.disks)
    if changes.get("mode") == "periodic" and rel.mode == "continuous":
        # The watchdog leaves it first (it follows continuous relationships only), then
        # the mirror ends; the bitmap carries on: no re-seeding either way.
        host.store.update_relationship(vm, mode="periodic")
        host.continuous.stop(vm)
    told = {k: changes[k] for k in ("history", "point_interval", "failover_ips")
            if k in changes}
    if told:
        host.client_for_peer(rel.peer, timeout=60).request(
            "POST", f"/v1/replica/relationships/{vm}/settings", told)
    if any(k in changes and changes[k] != getattr(rel, k) for k in ("frequency", "mode")):
        # A new schedule: health judges its slots from now on (domain.schedule).
        host.store.update_relationship(vm, schedule_since=time.time(), **changes)
    else:
        host.store.update_relationship(vm, **changes)
    shown = dict(changes)
    if "frequency" in shown:
        shown["frequency"] = format_frequency(shown["frequency"])
    if "failover_ips" in shown:
        shown["failover_ips"] = format_failover_ips(ips)
    host.event("relationship", "settings changed: " + ", ".join(f"{k}={v}" for k, v in
                                                                  shown.items()), vm)
    return {"vm": vm, **shown}
