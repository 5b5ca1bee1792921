"""What the primary's operations share: the relationship a command names (with the
error that says why there is none), a new primary-side row, and the checks of a mode and
of a disk that `enable` and `set` both make."""

from __future__ import annotations

import os
import stat
from typing import Any

from ..domain.links import is_dr, vm_name
from ..domain.relationship import Relationship
from ..domain.states import Role, State
from ..domain.tracking import scanned
from ..errors import NotFound, UsageError
from ..hypervisor.base import block_device_size


def relationship_of(host, vm: str, role: str = "primary") -> Relationship:
    """The relationship of ``vm`` on this host, on the side ``role`` ("" for either): the
    clear error otherwise (no such VM, not replicated, no DR link, the other side)."""
    rel = host.store.relationship(vm)
    if rel is None and is_dr(vm):
        raise NotFound(f"{vm_name(vm)} has no DR link on {host.name}",
                       hint=f"`vmreplica enable {vm_name(vm)} --replica HOST:PORT --dr` where "
                            "it runs; `vmreplica status` lists the links of this host")
    if rel is None:
        try:
            host.driver.inspect(vm)
        except NotFound:
            raise NotFound(f"no VM named {vm} on {host.name}",
                           hint="`vmreplica vm list` shows the VMs of this host") from None
        raise NotFound(f"VM {vm} is not replicated", hint=f"enable it with `vmreplica enable {vm} "
                                                          "--replica HOST:PORT`")
    if role and rel.role != role:
        raise UsageError(f"{host.name} is the {rel.role} side of {vm}: run this on its "
                         f"{role} ({rel.peer})")
    return rel


def primary_row(key: str, rel_id: str, peer: dict, state: State, epoch: int,
                disks: list[str], **fields: Any) -> Relationship:
    """A new primary-side relationship: the fields given, every other one at its default
    (domain.relationship: no tracking point yet, no cycle acknowledged)."""
    return Relationship(vm=key, id=rel_id, role=Role.PRIMARY.value, peer=peer["name"],
                        peer_address=peer["address"], state=state.value, epoch=epoch,
                        disks=disks, **fields)


MODES = ("periodic", "continuous")
COMPRESSIONS = ("zstd", "none")


def check_mode(host, mode: str, max_stall: float) -> None:
    """A replication mode this host's driver can run, and a stall bound in range (the
    disks a continuous mirror can take: ``check_mirrorable``)."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}", hint="choose periodic or continuous")
    if mode == "continuous" and not host.driver.continuous:
        raise UsageError(f"continuous mode is not available on {host.driver.name} hosts",
                         hint="use --mode periodic")
    if not 0.5 <= float(max_stall) <= 120:
        raise UsageError("--max-stall must be between 0.5 and 120 seconds")


def check_mirrorable(vm: str, tracking: dict[str, str], disks: list[str]) -> None:
    """Continuous mode for ``disks`` of ``vm`` (their change tracking as the driver says,
    ``tracking``): refused for a disk tracked by hash scan (an existing libvirt domain's
    raw file or block device: no dirty bitmap). The mirror starts, and comes back after
    its job is lost, from the tracking: a cycle with the guest paused for its length
    (primary.mirror_steps), which for such a disk reads and hashes the whole disk."""
    scan = scanned(tracking, disks)
    if not scan:
        return
    which = f"disk{'s' if len(scan) > 1 else ''} {', '.join(scan)}"
    raise UsageError(
        f"continuous mode cannot replicate {which} of {vm}: a raw file or block device "
        "holds no dirty bitmap, so it is tracked by hash scan, and every start of the "
        "mirror would pause the VM while the whole disk is read and compared",
        hint=f"replicate it periodically (--mode periodic), exclude it "
             f"(--exclude-disk {scan[0]}), or convert it to qcow2 while the VM is off "
             f"(`qemu-img convert -O qcow2`, then `virsh edit {vm}`)")


def check_disk(vm: str, d, existing: bool = False) -> None:
    """qcow2 (v3: persistent bitmaps) and raw (tracked while the VM runs, resynchronised
    after a restart) image files can be replicated; for an existing libvirt domain
    (``existing``) also raw block devices (an LVM logical volume, say). Raw files and
    block devices of existing domains hold no bitmap: they are tracked by the hash scan
    (domain.tracking.SCAN). Anything else — a network disk, a pool volume, a missing
    image or device node, a block device whose size cannot be read — is refused."""
    from ..qemutools import img
    allowed = ("file", "block") if existing else ("file",)
    if d.kind not in allowed:
        what = "image files (qcow2, raw) and block devices" if existing else \
            "disks that are image files (qcow2, raw)"
        raise UsageError(f"disk {d.name} of {vm} is a {d.kind} disk ({d.path or 'no source'}):"
                         f" only {what} can be replicated",
                         hint=f"exclude it with `--exclude-disk {d.name}`")
    if d.kind == "block":
        _check_block_device(vm, d)
        return
    if existing and not os.path.isfile(d.path):
        raise UsageError(f"disk {d.name} of {vm} is missing: no image file {d.path}",
                         hint=f"restore it, fix the domain (`virsh edit {vm}`), or exclude it "
                              f"with `--exclude-disk {d.name}`")
    if d.format == "raw":
        return
    if d.format != "qcow2":
        raise UsageError(f"disk {d.name} of {vm} is {d.format}: only qcow2 and raw disks can "
                         "be replicated",
                         hint=f"convert it (`qemu-img convert -O qcow2`) or exclude it with "
                              f"`--exclude-disk {d.name}`")
    compat = img.info(d.path).get("format-specific", {}).get("data", {}).get("compat")
    if compat == "0.10":
        raise UsageError(f"disk {d.name} of {vm} is qcow2 version 2 (compat 0.10), which cannot "
                         "keep persistent dirty bitmaps",
                         hint=f"upgrade it while the VM is off: `qemu-img amend -o compat=1.1 "
                              f"{d.path}`, or exclude it with `--exclude-disk {d.name}`")


def _check_block_device(vm: str, d) -> None:
    """A block disk: a device node that exists, holds the guest's bytes as they are (raw),
    and has a size (libvirt's, else the device's own)."""
    hint = f"fix the domain (`virsh edit {vm}`) or exclude it with `--exclude-disk {d.name}`"
    try:
        st = os.stat(d.path) if d.path else None
    except OSError:
        st = None
    if st is None:
        raise UsageError(f"disk {d.name} of {vm} is a block device that is missing: no device "
                         f"node {d.path or '(no source)'}", hint=hint)
    if not stat.S_ISBLK(st.st_mode):
        raise UsageError(f"disk {d.name} of {vm} is a block disk, but {d.path} is not a block "
                         "device", hint=hint)
    if d.format != "raw":
        raise UsageError(f"disk {d.name} of {vm} is a block device holding {d.format}: only "
                         "raw block devices can be replicated", hint=hint)
    if block_device_size(d.path) <= 0 or d.virtual_size <= 0:
        raise UsageError(f"disk {d.name} of {vm}: the size of block device {d.path} cannot be "
                         "read", hint=hint)
