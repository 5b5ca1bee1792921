"""The replica's side of `remove`: the removal itself (``remove_relationship``), telling
the primary, the tombstone kept when it cannot be told, and the copy `--keep-replica`
leaves for the existing-copy seed.

Tombstones (setting ``removed_replicas``: {vm: {vm, id, peer, at}}): `remove` ran here
while the primary could not be reached. The primary's next call for that VM (a cycle, a
state check) is refused with ``Removed``, and it ends its own side; its DELETE then drops
the tombstone, as does a new relationship for the VM.

A kept replica (``STORAGE/VM.kept/``, beside the replica's chains, which go):

    vm.json         {"format": "vmreplica-kept-replica", "version": 1, "name", "uuid" (the
                    VM's identity, the primary's), "memory_mb", "guest", "agent",
                    "network", "disks": [{"name", "path", "format", "virtual_size"}],
                    "relationship", "primary", "replica", "last_applied_cycle", "kept_at"}
    DISK.qcow2      each disk's chain flattened into its base: a standalone image

The replica VM stays defined on those images (an ordinary VM now, which the operator may
start; `vm delete` removes it with the folder). `enable` of the same VM (same identity)
from a primary takes that VM's place and leaves the folder for `initial VM --method
existing --path STORAGE/VM.kept`; any other VM of that name is refused, as before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from ..domain.relationship import Relationship
from ..domain.states import Role, State
from ..errors import (
    Conflict,
    NotFound,
    Refused,
    Removed,
    Superseded,
    TransportError,
    VmreplicaError,
)
from ..hypervisor.base import Origin
from ..qemutools import img
from . import mirror
from . import store as rstore

log = logging.getLogger("vmreplica.replica")

KEPT_FORMAT = "vmreplica-kept-replica"
_TOMBSTONES = "removed_replicas"
_guard = threading.Lock()


# -- the removal -----------------------------------------------------------------------
def remove_relationship(host, vm: str, keep_replica: bool, tell_primary: bool = False) -> dict:
    """End the replica side. ``tell_primary`` (`remove` run here): the primary ends its
    side first; if it cannot be reached a tombstone answers its next call (see
    above). ``keep_replica``: the VM stays, on standalone copies of its disks in
    ``STORAGE/VM.kept`` (the existing-copy seed of a later relationship)."""
    rel = host.store.relationship(vm)
    if rel is None or rel.role != Role.REPLICA.value:
        raise NotFound(f"{host.name} holds no replica of VM {vm}")
    if rel.state == State.FAILOVER_IN_PROGRESS.value:
        raise Conflict(f"a failover of {vm} to {host.name} is in progress",
                       hint=f"complete it (`vmreplica failover {vm} --complete`) or cancel it "
                            "(`--cancel`) first")
    # A VM that failed over to this host is the VM now (its chain was merged onto disks
    # of its own first, service.operations.remove): replication ends, the VM stays.
    failed_over = rel.state == State.FAILED_OVER.value
    told, primary_side = ask_primary(host, rel, keep_replica) if tell_primary \
        else (True, None)
    if keep_replica:
        try:            # what it keeps holds no part of a cycle (the VM's lock redoes it)
            with host.vm_lock(vm):
                pass
        except Exception as e:  # noqa: BLE001 — kept as is; the existing-copy seed evens it
            log.warning("keeping the replica of %s without its unapplied cycle: %s", vm, e)
    kept = None
    with host.vm_lock(vm).as_is():      # whatever its heads hold, they go
        mirror.close_target(host, vm)
        host.heads.close(vm)
        host.unsynced.pop(host.lock_key(vm), None)
        host.unapplied.discard(host.lock_key(vm))
        removed_vm = False
        try:
            info = host.driver.inspect(vm)
            if info.origin != Origin.VMREPLICA:
                # No replica VM here; the name is an existing libvirt domain's (the
                # primary's own, where one libvirtd holds both hosts): never touched.
                raise NotFound(f"no replica VM {vm}")
            if failed_over:
                pass                    # it runs here now, on its own disks: it stays
            elif keep_replica:
                if info.state == "running":
                    host.driver.stop(vm, force=True)
                kept = keep(host, vm, rel)
            else:
                if info.state == "running":
                    host.driver.stop(vm, force=True)
                host.driver.delete(vm)
                removed_vm = True
        except NotFound:
            pass
        if not failed_over and (not keep_replica or kept is not None):
            rstore.delete_chains(Path(rel.storage), vm)
        for p in (host.home.staging / vm).glob("*"):
            p.unlink(missing_ok=True)
        try:
            (host.home.staging / vm).rmdir()
        except OSError:
            pass
        host.store.remove_relationship(vm)
        if not told:
            bury(host, rel)
    host.event("relationship", f"replica of {vm} removed"
               + (" (it failed over to here: the VM stays, on its own disks)" if failed_over
                  else f" (VM kept, its disks in {kept})" if kept is not None else
                  " (VM and disks kept)" if keep_replica else "")
               + (f"; {primary_side}" if primary_side else ""), vm)
    return {"vm": vm, "removed_vm": removed_vm, "kept": keep_replica,
            "kept_copy": str(kept) if kept is not None else None,
            "primary_side": primary_side}


# -- telling the primary -------------------------------------------------------------
def ask_primary(host, rel: Relationship, keep: bool) -> tuple[bool, str]:
    """Ask the primary to end its side of ``rel`` first (its mirror, its tracking
    bitmaps, its row). Returns (told, what to report): told is False only when the
    primary could not be reached (then a tombstone is kept)."""
    try:
        host.client_for_peer(rel.peer, timeout=60).request(
            "POST", f"/v1/peer/relationships/{rel.vm}/removed",
            {"id": rel.id, "keep": bool(keep)})
        return True, f"the primary {rel.peer} ended its side"
    except (NotFound, Refused, Superseded) as e:
        # It holds nothing of this relationship (already removed there, or another one).
        return True, f"the primary {rel.peer} holds no part of it ({e.message})"
    except TransportError as e:     # unreachable, not trusted any more
        return False, (f"the primary {rel.peer} could not be reached ({e.message}): it "
                       "ends its side when it next calls")
    except VmreplicaError as e:     # it failed to (or no address is known for it)
        return False, (f"the primary {rel.peer} did not end its side ({e.message}): it "
                       "does when it next calls")


def _stones(host) -> dict:
    return dict(host.store.get_setting(_TOMBSTONES) or {})


def bury(host, rel: Relationship) -> None:
    with _guard:
        stones = _stones(host)
        stones[rel.vm] = {"vm": rel.vm, "id": rel.id, "peer": rel.peer,
                             "at": time.time()}
        host.store.set_setting(_TOMBSTONES, stones)


def forget(host, vm: str, peer: str | None = None) -> bool:
    """Drop the tombstone of ``vm`` (only ``peer``'s, if given). True if there was one."""
    with _guard:
        stones = _stones(host)
        stone = stones.get(vm)
        if stone is None or (peer is not None and stone["peer"] != peer):
            return False
        del stones[vm]
        host.store.set_setting(_TOMBSTONES, stones)
        return True


def refuse_if_removed(host, peer: dict, vm: str) -> None:
    """Before a primary's call for ``vm`` is served: if this host removed its replica of
    it while that primary could not be told, say so (Removed), not just "no replica"."""
    if host.store.relationship(vm) is not None:
        return
    stone = _stones(host).get(vm)
    if stone is None or stone["peer"] != peer["name"]:
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stone["at"]))
    raise Removed(f"{host.name} removed its replica of {vm} at {when} (`vmreplica remove` "
                  f"ran there while {peer['name']} could not be reached): the replication "
                  "has ended",
                  hint=f"{peer['name']} ends its side by itself; enable it again with "
                       f"`vmreplica enable {vm} --replica {host.name}...` to protect the VM")


# -- the kept copy ---------------------------------------------------------------------
def kept_dir(storage: Path, vm: str) -> Path:
    return Path(storage) / f"{vm}.kept"


def keep(host, vm: str, rel: Relationship) -> Path:
    """The replica VM (stopped, heads closed, under its lock) made standalone: each
    disk's chain, from what the VM uses now down to the chain's base, committed into that
    base (it costs the layers above the base, not the disk), which moves to
    ``STORAGE/VM.kept/DISK.qcow2``; a vm.json there says whose copy it is. The VM is
    pointed at those images and owns the folder; the chains' folder is for the caller
    to delete."""
    storage = Path(rel.storage)
    kept = kept_dir(storage, vm)
    new = kept.with_name(kept.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    info = host.driver.inspect(vm)
    desc = host.driver.describe(vm)
    disks = []
    for d in info.disks:
        chain = img.info(d.path, backing_chain=True)
        chain = chain if isinstance(chain, list) else [chain]
        base, fmt = chain[-1]["filename"], chain[-1].get("format") or "qcow2"
        if base != d.path:
            img.commit(d.path, base)
        dest = new / f"{d.name}.{fmt}"
        shutil.move(base, dest)          # a rename inside the storage (the usual case)
        disks.append({"name": d.name, "path": str(kept / dest.name), "format": fmt,
                      "virtual_size": int(d.virtual_size)})
    meta = {"format": KEPT_FORMAT, "version": 1, "name": vm, "uuid": desc["uuid"],
            "memory_mb": desc.get("memory_mb"), "guest": desc.get("guest"),
            "agent": bool(desc.get("agent")), "network": desc.get("network") or "none",
            "disks": disks, "relationship": rel.id, "primary": rel.peer,
            "replica": host.name, "last_applied_cycle": rel.last_applied_cycle,
            "kept_at": time.time()}
    (new / "vm.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    shutil.rmtree(kept, ignore_errors=True)   # an older kept copy (its images moved above)
    os.replace(new, kept)
    host.driver.set_disks(vm, {d["name"]: d["path"] for d in disks})
    host.driver.add_owned(vm, [str(kept)])
    return kept


def kept_replica(host, vm: str, identity: str | None) -> Path | None:
    """A new relationship for ``vm`` (identity ``identity``): None if no VM of that name
    is here; the folder of its kept copy if the VM of that name is a kept replica of the
    same VM (same identity); otherwise Conflict, as for any VM of that name."""
    try:
        info = host.driver.inspect(vm)
    except NotFound:
        return None
    if info.origin != Origin.VMREPLICA:
        # An existing libvirt domain of that name (where one libvirtd holds both hosts,
        # the primary's own): the replica VM (vmr-HOST-NAME) shadows it, no conflict.
        return None
    folders = {Path(d.path).parent for d in info.disks}
    meta = {}
    if len(folders) == 1:
        try:
            meta = json.loads((next(iter(folders)) / "vm.json").read_text())
        except (OSError, ValueError):
            meta = {}
    if not (meta.get("format") == KEPT_FORMAT and meta.get("name") == vm and identity
            and meta.get("uuid") == identity == info.uuid):
        what = ("a kept replica of another VM of that name (identity "
                f"{info.uuid})" if meta.get("format") == KEPT_FORMAT else "not a replica")
        raise Conflict(f"{host.name} already has a VM named {vm} ({what})",
                       hint=f"delete or rename it on {host.name}, then enable again")
    if info.state == "running":
        raise Conflict(f"the kept replica of {vm} on {host.name} is running",
                       hint=f"stop it on {host.name} (`vmreplica vm stop {vm}`), then enable "
                            "again; its disks are then seeded from with `initial --method "
                            "existing`")
    return next(iter(folders))


def release(host, vm: str, kept: Path) -> None:
    """Undefine the kept replica VM, leaving its folder (which it owns) in place: the
    folder steps aside while the VM is deleted."""
    aside = kept.with_name(kept.name + ".aside")
    os.replace(kept, aside)
    try:
        host.driver.delete(vm)
    finally:
        os.replace(aside, kept)


def redefine(host, kept: Path) -> None:
    """Put the kept replica VM back (a new relationship that took its place failed)."""
    meta = json.loads((kept / "vm.json").read_text())
    host.driver.define_vm({**meta, "owns": [str(kept)]})

