"""The replica follows the primary's configuration: before each cycle of an existing
libvirt domain (an operator's, `origin existing`), its inactive XML's digest and its
disks' sizes are compared with the ones last sent (domain.config); on a difference:

- disks: the replica's chains follow (``POST …/disks``: a new disk gets an empty chain,
  a removed one's chain is deleted, a grown one's head grows), the relationship's disks
  with them; a new disk is seeded by a resync — the disks already replicated match the
  replica's copy and move only their changes — run at once where the relationship's
  resync window allows, else in the window. A new disk that cannot be replicated (a
  network disk, say; in continuous mode also a raw file or block device, which only the
  hash scan tracks) is excluded and reported, never silently dropped.
- the definition (memory, vCPUs, CPU, NICs, ...): the replica VM is defined again from
  the new XML (``POST …/definition``, replica.lifecycle.follow_definition). A refusal
  there (a new NIC on a network with no mapping, a device that cannot be carried) is
  reported once as an event; the replica VM keeps its definition and the next cycles ask
  again (the operator may add the mapping meanwhile).

One event says what changed. Only the replica VM's definition changes, never the
primary's. A VM made by vmreplica (or a carried one, after a reverse) has no operator's
definition to follow: nothing happens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..domain import config as dconfig
from ..domain.links import vm_name
from ..domain.states import State
from ..errors import TransportError, UsageError, VmreplicaError
from ..hypervisor.base import Origin
from ..qemutools import img
from ..tracking.bitmap import bitmap_prefix
from .common import check_disk, check_mirrorable
from .cycle import run_cycle
from .resync import resync, window_open

log = logging.getLogger("vmreplica.primary")


@dataclass
class Followed:
    """What ``follow`` did: the changes the replica followed (one line each), whether
    a resync is due (a disk joined or shrank), why the definition did not follow."""
    changes: list[str] = field(default_factory=list)
    resync: bool = False
    refused: str | None = None

    def to_dict(self) -> dict:
        return {"changes": self.changes, "resync": self.resync, "refused": self.refused}


def follow(host, vm: str) -> Followed:
    """Send what changed in ``vm``'s configuration to its replica (see the module)."""
    store = host.store
    name = vm_name(vm)
    rel = store.relationship(vm)
    info = host.driver.inspect(name)
    if info.origin != Origin.EXISTING:
        return Followed()
    desc = host.driver.describe(name)
    definition = str(desc.get("definition") or "")
    digest = dconfig.digest(definition)
    current = [(d.name, d.virtual_size) for d in info.disks]
    paths = {d.name: d.path for d in info.disks}
    if not rel.disk_sizes:          # (a row older than this: the sizes as they are now)
        rel = store.update_relationship(vm, disk_sizes={d: s for d, s in current
                                                        if d in rel.disks},
                                        disk_paths={d: paths[d] for d in rel.disks
                                                    if d in paths})
    sent = rel.disk_sizes
    plan = dconfig.disk_plan(rel.disks, rel.excluded, current, sent)
    if not plan.changed and digest == rel.definition_digest:
        if rel.definition_refused:      # (a reason reported earlier is over)
            store.update_relationship(vm, definition_refused=None)
        return Followed()
    by_name = {d.name: d for d in info.disks}
    refused = {}
    tracking = host.driver.disk_tracking(name) if plan.added and rel.mode == "continuous" \
        else {}
    for d in plan.added:
        try:
            check_disk(name, by_name[d], existing=True)
            check_mirrorable(name, tracking, [d])     # (continuous mode: no scanned disk)
        except UsageError as e:
            refused[d] = e.message
    plan = plan.refusing(list(refused))
    for d, why in refused.items():
        host.event("config", f"disk {d} was added to {name} but cannot be replicated: {why}; "
                             f"it is excluded (`vmreplica set {vm} --include-disk {d}` once "
                             "it can be)", vm)
    if not plan.disks:
        why = "every replicated disk was removed from the domain"
        if rel.definition_refused != why:
            store.update_relationship(vm, definition_refused=why)
            host.event("config", f"{name}: {why}; its replica keeps the last copy "
                                 f"(`vmreplica remove {vm}` ends the replication)", vm)
        return Followed(refused=why)
    done = Followed()
    client = host.client_for_peer(rel.peer, timeout=120)
    with host.vm_lock(vm):
        if plan.changed or refused:
            if plan.changed:
                client.request("POST", f"/v1/replica/relationships/{name}/disks",
                               {"disks": [d for d in desc["disks"] if d["name"] in plan.disks]})
            sizes = {d: s for d, s in current if d in plan.disks}
            changes = {"disks": plan.disks, "excluded": plan.excluded, "disk_sizes": sizes,
                       "disk_paths": {d: paths[d] for d in plan.disks}}
            if plan.resync:
                why = ", ".join(plan.lines()[:3]) + " on the primary"
                store.set_state(vm, State.RESYNC_REQUIRED, why=why, resync_reason=why,
                                **changes)
                done.resync = True
            else:
                store.update_relationship(vm, **changes)
            done.changes += plan.lines()
            for d in plan.removed:
                _drop_bitmaps(host, vm, rel, rel.disk_paths.get(d), set(paths.values()))
        if digest != rel.definition_digest:
            try:
                answer = client.request("POST", f"/v1/replica/relationships/{name}/definition",
                                        {"definition": definition})
            except UsageError as e:
                done.refused = e.message + (f" ({e.hint})" if e.hint else "")
            else:
                store.update_relationship(vm, definition_digest=digest, definition_refused=None)
                done.changes += [c for c in answer.get("changes") or []
                                 if c not in done.changes]
    if done.refused and done.refused != rel.definition_refused:
        store.update_relationship(vm, definition_refused=done.refused)
        host.event("config", f"{rel.peer} cannot follow the new definition of {name}: "
                             f"{done.refused}; its replica VM keeps its definition, the next "
                             "cycles ask again", vm)
    if done.changes:
        seeded = " (the new disk is seeded by a resync: the others move only their " \
                 "changes)" if plan.added else ""
        host.event("config", f"the replica VM on {rel.peer} follows {name}'s configuration: "
                             + "; ".join(done.changes) + seeded, vm)
    return done


def _drop_bitmaps(host, vm: str, rel, path: str | None, used: set[str]) -> None:
    """A disk removed from the domain: its image (if it is still there, a qcow2 file the
    domain no longer uses) loses this relationship's bitmaps — nothing left behind. An
    image another process holds keeps them (an event says which)."""
    if not path or path in used or not os.path.isfile(path):
        return
    prefix = bitmap_prefix(rel.id)
    try:
        names = [b["name"] for b in img.bitmaps(path) if b.get("name", "").startswith(prefix)]
        img.bitmap(path, *(("--remove", n) for n in names))
    except VmreplicaError as e:
        host.event("config", f"the change-tracking bitmaps of {rel.id[:8]} stay on {path}, "
                             f"a disk removed from {vm_name(vm)}: {e.message} (`qemu-img "
                             f"bitmap --remove {path} NAME` once it is free)", vm)


def cycle(host, vm: str, verify: bool = False, slot: float | None = None) -> dict:
    """A cycle of ``vm``, its configuration followed first: a delta cycle, or the resync
    that seeds a disk added to it (deferred to the resync window when there is one and
    it is shut: then the figures say ``deferred``)."""
    try:
        followed = follow(host, vm)
    except TransportError as e:       # (the cycle meets it too, and records it)
        log.info("configuration of %s not sent: %s", vm, e.message)
        followed = Followed()
    except VmreplicaError as e:
        why = f"its configuration could not be read or sent: {e.message}"
        log.warning("%s: %s", vm, why)
        if host.store.relationship(vm).definition_refused != why:     # (once per reason)
            host.store.update_relationship(vm, definition_refused=why)
            host.event("config", f"{why}; the next cycles try again", vm)
        followed = Followed()
    rel = host.store.relationship(vm)
    if followed.resync and rel.state == State.RESYNC_REQUIRED.value:
        if not window_open(rel):
            return {"vm": vm, "deferred": True, "window": rel.resync_window,
                    "config": followed.to_dict()}
        stats = resync(host, vm)
    else:
        stats = run_cycle(host, vm, verify=verify, slot=slot)
    if followed.changes or followed.refused:
        stats["config"] = followed.to_dict()
    return stats
