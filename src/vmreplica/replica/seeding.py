"""The replica's side of seeding: import an exported seed from a folder (removable
media), or adopt a copy of the VM it already holds (restored from a backup, a kept
replica) after checking that the copy is of the same VM."""

from __future__ import annotations

import json
from pathlib import Path

from ..domain.relationship import Relationship
from ..domain.states import Role, State
from ..errors import IntegrityError, NotFound, Refused, UsageError
from ..qemutools import img
from ..transport import wire
from . import store as rstore


def _replica_rel(host, vm: str) -> Relationship:
    rel = host.store.relationship(vm)
    if rel is None or rel.role != Role.REPLICA.value:
        raise NotFound(f"{host.name} holds no replica of {vm}",
                       hint="enable replication on the primary first")
    return rel


def import_seed(host, vm: str, folder: str | Path) -> dict:
    from .checks import check_header
    from .receiver import receive_initial
    rel = host.store.relationship(vm)
    if rel is not None and rel.role == Role.PRIMARY.value:
        # The operator ran the import where the seed was exported: say where it runs.
        raise UsageError(f"{host.name} is the primary of {vm}: a seed is imported on its "
                         f"replica, {rel.peer}",
                         hint=f"take the folder to {rel.peer} and run `vmreplica initial "
                              f"{vm} --import DIR` there")
    if rel is None:
        raise NotFound(f"{host.name} holds no replica of {vm}",
                       hint=f"a seed is imported on the replica host, after `vmreplica enable "
                            f"{vm} --replica {host.listen}` on the primary")
    rel = _replica_rel(host, vm)
    folder = Path(folder).absolute()
    try:
        meta = json.loads((folder / "seed.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{folder} holds no readable vmreplica seed ({e})",
                         hint="give the folder made by `initial VM --method export --path DIR`") \
            from None
    if meta.get("format") != "vmreplica-seed":
        raise UsageError(f"{folder}/seed.json is not a vmreplica seed")
    if meta.get("vm") != vm or meta.get("relationship") != rel.id:
        raise Refused(f"the seed in {folder} is for VM {meta.get('vm')} (relationship "
                      f"{str(meta.get('relationship'))[:8]}), not for this replica of {vm} "
                      f"({rel.id[:8]})", hint="export a new seed from the primary")
    if rel.state != State.WAITING_FOR_INITIAL.value:
        raise Refused(f"{vm} is already seeded (state {rel.state})")
    try:
        with open(folder / "seed.vmrc", "rb") as f:
            reader = wire.reader_for_file(f)
            header = reader.start()
            if header.get("relationship") != rel.id or not header.get("initial"):
                raise IntegrityError(f"{folder}/seed.vmrc does not match its seed.json")
            cycle = check_header(host, rel, header)
            with host.vm_lock(vm):
                result = receive_initial(host, vm, cycle, reader)
    except IntegrityError as e:
        raise IntegrityError(f"the seed in {folder} is damaged and was not imported: "
                             f"{e.message}", hint="export a new seed on the primary") from None
    host.event("initial", f"seed imported from {folder}: {result['records']} records, "
                          "verified", vm)
    return {"vm": vm, "imported": str(folder), "cycle": cycle, **result}


def adopt(host, peer: dict, vm: str, body: dict) -> dict:
    rel = _replica_rel(host, vm)
    if rel.peer != peer["name"]:
        raise Refused(f"{host.name} replicates {vm} from {rel.peer}, not {peer['name']}")
    if rel.state not in (State.WAITING_FOR_INITIAL.value, State.RESYNC_REQUIRED.value):
        raise Refused(f"{vm} is already seeded on {host.name} (state {rel.state})")
    folder = Path(str(body.get("path", ""))).absolute()
    try:
        desc = json.loads((folder / "vm.json").read_text())
    except (OSError, ValueError):
        raise UsageError(f"{folder} on {host.name} holds no VM description (vm.json)",
                         hint="give the folder of a VM copy: its vm.json and disk images") \
            from None
    if desc.get("uuid") != body.get("identity"):
        raise Refused(f"the copy in {folder} is of VM {desc.get('name')} (identity "
                      f"{desc.get('uuid')}), not of {vm} ({body.get('identity')}): refused, "
                      "nothing was merged",
                      hint="point --path at a copy of this VM, or seed over the network")
    by_name = {d["name"]: d for d in desc.get("disks", [])}
    chains = {}
    for disk in rel.disks:
        entry = by_name.get(disk)
        if entry is None:
            raise Refused(f"the copy in {folder} has no disk {disk}")
        path = folder / Path(entry["path"]).name
        if not path.exists():
            path = Path(entry["path"])
        if not path.exists():
            raise Refused(f"disk {disk} of the copy is missing ({folder / Path(entry['path']).name})")
        meta = img.info(path)
        if meta.get("format") != "qcow2":
            raise Refused(f"disk {disk} of the copy is {meta.get('format')}, not qcow2",
                          hint=f"convert it: qemu-img convert -O qcow2 {path} {path}.qcow2")
        want = _size(host, vm, disk)
        if int(meta["virtual-size"]) != want:
            raise Refused(f"disk {disk} of the copy is {meta['virtual-size']} bytes, the VM's "
                          f"is {want}")
        chains[disk] = [str(path)]
    with host.vm_lock(vm):
        host.heads.close(vm)
        old = [p for c in rel.chains.values() for p in c]
        host.store.set_state(vm, State.RESYNCHRONIZING.value, chains=chains,
                                       index_valid=False, last_applied_cycle=-1)
        host.driver.set_disks(vm, {d: c[-1] for d, c in chains.items()})
        host.driver.add_owned(vm, [str(folder)])
        rstore.drop_layers(old)
    host.event("initial", f"adopted the copy in {folder} (same VM identity); resynchronizing "
                          "the differences", vm)
    return {"vm": vm, "adopted": str(folder)}


def _size(host, vm: str, disk: str) -> int:
    for d in host.driver.inspect(vm).disks:
        if d.name == disk:
            return d.virtual_size
    raise NotFound(f"{vm} has no disk {disk}")
