"""Every way to seed a replica: over the network (the initial cycle), exported to a
folder for removable media (imported on the replica), from a copy the replica already
holds (verified to be this VM's, then only differences move), now or at a set time.

An export is the initial cycle's stream itself (`seed.vmrc`, the wire format: a BLAKE3
checksum per extent and a digest over the whole) plus `seed.json` naming the VM, its
identity and the relationship; tracking starts at the export's freeze, so the first
delta after the import carries everything written since.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..domain.schedule import parse_when, unscheduled_cover
from ..domain.states import State
from ..domain.units import format_size
from ..errors import Conflict, UsageError
from .common import relationship_of
from .cycle import run_cycle

METHODS = ("network", "export", "existing")


def initial(host, vm: str, method: str = "network", path: str | None = None,
            at: str | None = None, verify: bool = False) -> dict:
    rel = relationship_of(host, vm)
    if method not in METHODS:
        raise UsageError(f"unknown initial method {method!r}", hint="choose " + ", ".join(METHODS))
    if rel.state not in (State.READY_FOR_INITIAL.value, State.INITIAL_IN_PROGRESS.value):
        raise Conflict(f"initial replication of {vm} is already done (state {rel.state})",
                       hint=f"`vmreplica sync {vm}` runs a cycle now")
    if method != "network" and "@" in vm:
        raise UsageError(f"a DR link is seeded over the network (`vmreplica initial {vm}`)")
    if method in ("export", "existing") and not path:
        raise UsageError(f"--method {method} needs --path DIR")
    if at:
        when = parse_when(at, time.time())
        host.store.update_relationship(vm, initial_at=when,
                                       initial_plan={"method": method, "path": path})
        host.event("initial", f"initial replication ({method}) scheduled for "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}", vm)
        return {"vm": vm, "scheduled_at": when, "method": method}
    host.store.update_relationship(vm, initial_at=None, initial_plan=None)
    if method == "network":
        return _network(host, vm, verify)
    assert path is not None                     # (export and existing: checked above)
    if method == "export":
        return _export(host, vm, Path(path))
    return _existing(host, vm, path)


def _network(host, vm: str, verify: bool) -> dict:
    host.store.set_state(vm, State.INITIAL_IN_PROGRESS.value)
    host.event("initial", "initial replication started", vm)
    try:
        stats = run_cycle(host, vm, mode="initial", verify=verify)
    except Exception:
        if host.store.relationship(vm).state == State.INITIAL_IN_PROGRESS.value:
            host.store.set_state(vm, State.READY_FOR_INITIAL.value)   # not a fence, say
        raise
    host.store.set_state(vm, State.REPLICATING.value,
                                   replicating_since=time.time())
    host.event("initial", f"initial replication done: {format_size(stats.get('raw_bytes', 0))}", vm)
    return stats


def _export(host, vm: str, folder: Path) -> dict:
    rel = host.store.relationship(vm)
    folder = folder.absolute()
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "seed.json").exists():
        raise Conflict(f"{folder} already holds a seed", hint="use an empty folder")
    stats = run_cycle(host, vm, mode="initial", export_to=folder / "seed.vmrc")
    desc = host.driver.describe(vm)
    meta = {"format": "vmreplica-seed", "version": 1, "vm": vm, "identity": desc["uuid"],
            "relationship": rel.id, "epoch": rel.epoch, "cycle": stats["cycle"],
            "primary": host.name, "replica": rel.peer, "created_at": time.time(),
            "disks": [d for d in desc["disks"] if d["name"] in rel.disks],
            "stream_bytes": os.path.getsize(folder / "seed.vmrc")}
    (folder / "seed.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    host.store.set_state(vm, State.INITIAL_IN_PROGRESS.value,
                                   seed={"cycle": stats["cycle"], "path": str(folder)})
    host.event("initial", f"seed exported to {folder} ({format_size(stats['raw_bytes'])} of data); "
                          f"import it on {rel.peer}", vm)
    stats.update(exported=str(folder),
                 next=f"carry {folder} to {rel.peer}, there: vmreplica initial {vm} "
                      f"--import DIR")
    return stats


def _existing(host, vm: str, path: str) -> dict:
    """The replica adopts a copy it holds (after checking it is this VM's), then a
    resynchronisation ships only the blocks that differ."""
    from .resync import resync
    rel = host.store.relationship(vm)
    desc = host.driver.describe(vm)
    host.client_for_peer(rel.peer, timeout=300).request(
        "POST", f"/v1/replica/relationships/{vm}/adopt",
        {"path": path, "identity": desc["uuid"]})
    host.store.set_state(vm, State.RESYNC_REQUIRED.value,
                                   resync_reason="seeded from a copy on the replica")
    stats = resync(host, vm)
    host.event("initial", f"seeded from the copy in {path} on {rel.peer}: "
                          f"{format_size(stats['bytes_moved'])} moved", vm)
    return stats


def imported(host, vm: str, answer: dict) -> bool:
    """The replica reports the seed applied: replication proper begins."""
    rel = host.store.relationship(vm)
    seed = rel.seed
    if not seed or int(answer.get("last_applied_cycle", -1)) < int(seed["cycle"]):
        return False
    now = time.time()
    host.store.set_state(vm, State.REPLICATING.value, seed=None, replicating_since=now,
                         unscheduled_until=unscheduled_cover("initial", now, rel.frequency))
    host.event("initial", f"{rel.peer} imported the seed: replicating", vm)
    return True
