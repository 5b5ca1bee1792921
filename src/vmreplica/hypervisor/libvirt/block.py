"""The libvirt driver's block access for change tracking: ``LibvirtBlockSession``'s
frozen views of a domain's disks (libvirt pull-mode backups while it runs, a
qemu-storage-daemon on the same persistent bitmaps while it is shut off; its checkpoint
bookkeeping is ``checkpoints.CheckpointOps``), and the driver's block-access part.

- ``freeze(since, new)`` while running is one ``virDomainBackupBegin`` (pull mode,
  ``<incremental>since``) with a checkpoint XML creating ``new``: the frozen view and the
  new checkpoint are atomic. The export is named after the disk target (vda), its dirty
  context ``qemu:dirty-bitmap:backup-vda``.
- Off, QEMU refuses a read-only NBD export of an enabled bitmap, so the view exports a
  disabled copy named like libvirt's (``backup-vdX``).
- Disks that cannot hold a persistent bitmap — raw files, block devices
  (``DiskDef.checkpointed`` false) — are tracked by the hash scan (``disk_tracking``):
  no checkpoint covers them (``checkpoint='no'``), a freeze with ``since`` exports them
  whole (``backupmode='full'`` in the pull backup), without a dirty-bitmap context, and
  the cycle compares their blocks with the replica's hash index. While the domain is off
  the storage daemon opens them read-only (a block device through ``host_device``): its
  lock keeps the domain from starting while a cycle reads them, and the data is read
  straight from the file or the device node (qemutools.imagemap).
- libvirt's pull backup is its only frozen view, and libvirt refuses it beside the
  mirror continuous mode runs: no live views (a DR link beside continuous mode needs the
  qemu driver).

Files:

    HOME/vms/NAME/scratch-vdX.qcow2  pull-backup scratch images (libvirt creates, labels
                                   and deletes them)
    HOME/vms/NAME/run/nbd.sock     the pull-backup NBD socket; QEMU creates it, so this
                                   folder is chowned to the uid:gid QEMU runs as
    HOME/run/lv-<uuid8>-bs.*       the storage daemon of a shut-off VM's block session

An existing domain (an operator's, vmreplica did not create it) has no VM folder of its
own: its session makes HOME/vms/NAME/ for the scratch images and the socket and removes
it again at close. While it is off only its file and block disks that exist are opened
(``enable`` refuses replicating any other kind, or a missing one).
"""

from __future__ import annotations

import logging
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from ...domain import tracking
from ...errors import HypervisorError, TrackingError, Unsupported
from ...qemutools import qmpsteps
from ...qemutools.qmp import QMPError
from ...qemutools.qsd import StorageDaemon, image_node
from ..base import Export
from .checkpoints import CheckpointOps
from .connection import LibvirtBase, Passthrough, lv_error, qemu_ids
from .domainxml import VMDef, domain_uuid

log = logging.getLogger("vmreplica.libvirt")

MAX_SOCKET_PATH = 107


class LibvirtBlockSession(CheckpointOps):
    """Change-tracking access to a domain's disks: libvirt checkpoints and pull-mode
    backups while it runs, a qemu-storage-daemon on the same bitmaps while it is off."""

    per_disk_bitmaps = False  # a checkpoint spans its disks: it goes as a whole
    live = False              # no live views (LibvirtDriver.live_views): views are frozen
    paused_seconds = 0.0      # ... so the guest is never paused for one

    def __init__(self, driver: LibvirtBase, dom: libvirt.virDomain, vm: VMDef):
        self.driver = driver
        self.dom = dom
        self.vm = vm
        self.vmdir = driver._dir(vm.name)
        self.disks = {d.name: d for d in vm.disks}
        self.qsd: StorageDaemon | None = None
        self._backup = False          # a libvirt pull backup of ours is running
        self._exports: list[str] = []  # off: export ids on the storage daemon
        self._temp: list[tuple[str, str]] = []  # off: (node, bitmap) made for a frozen view
        self._scratch: list[Path] = []
        self.running = driver._active(dom)
        if vm.existing:
            driver._mkdir_vm(self.vmdir)
        if self.running:
            self.qmp = Passthrough(dom)
            self.nbd_socket = self._socket_path()
            self._end_stale_backup()
        else:
            blockdevs = []
            for d in vm.disks:
                if d.kind in ("file", "block") and d.path and os.path.exists(d.path):
                    # (a scan-tracked disk is only read: opened read-only)
                    blockdevs += image_node(d.path, d.name, d.format,
                                            read_only=not d.checkpointed)
            short = domain_uuid(vm.host, vm.uuid)[:8]
            self.qsd = StorageDaemon(driver.run_dir, f"lv-{short}-bs", blockdevs).start()
            assert self.qsd.qmp is not None         # (started)
            self.qmp = self.qsd.qmp
            self.nbd_socket = str(self.qsd.nbd_socket)

    def _socket_path(self) -> str:
        path = self.vmdir / "run" / "nbd.sock"
        if len(str(path)) > MAX_SOCKET_PATH - 4:
            path = self.driver.run_dir / f"lv-{domain_uuid(self.vm.host, self.vm.uuid)[:8]}" / "nbd.sock"
        return str(path)

    # -- freeze --------------------------------------------------------------------------
    def freeze(self, disks: list[str], since: str | None, new: str | None) -> dict[str, Export]:
        """Fix a point-in-time view of ``disks`` exported over NBD (with the changes since
        checkpoint ``since`` as its dirty-bitmap context) and start checkpoint ``new``."""
        if self._backup or self._exports:
            raise HypervisorError(f"a frozen view of {self.vm.name} is already exported")
        unknown = [x for x in disks if x not in self.disks]
        if unknown:
            raise HypervisorError(f"VM {self.vm.name} has no disk {unknown[0]}")
        tracked = [x for x in disks if self.disks[x].checkpointed]
        if since and tracked:
            self._require_checkpoint(tracked, since)
        if self.running:
            return self._freeze_running(disks, since, new)
        return self._freeze_off(disks, since, new)

    def _require_checkpoint(self, disks: list[str], since: str) -> None:
        cps = self._checkpoints()
        nodes = self._nodes()
        for x in disks:
            b = self._disk_bitmaps(x, nodes).get(since)
            if b is None:
                raise TrackingError(f"change-tracking bitmap {since} is missing on disk {x}")
            if b.get("inconsistent"):
                raise TrackingError(f"change-tracking bitmap {since} on disk {x} is "
                                    "inconsistent (its QEMU stopped without saving it)")
        tracked = cps.get(since)
        targets = {self.disks[x].target for x in disks}
        if tracked is None:
            # Bitmaps without libvirt metadata (a crash between the two): adopt them.
            log.info("%s: recording checkpoint %s for bitmaps found on disk", self.vm.name, since)
            self._redefine_checkpoint(since, targets)
        elif not targets <= set(tracked):
            raise TrackingError(f"checkpoint {since} of {self.vm.name} does not track every "
                                "replicated disk")

    def _freeze_running(self, disks: list[str], since: str | None,
                        new: str | None) -> dict[str, Export]:
        live_xml = self.dom.XMLDesc(0)
        sock = Path(self.nbd_socket)
        sock.parent.mkdir(parents=True, exist_ok=True)
        ids = qemu_ids(live_xml)
        if ids is not None:
            os.chown(sock.parent, *ids)   # QEMU binds the NBD socket in here
        os.chmod(sock.parent, 0o750)
        sock.unlink(missing_ok=True)
        backup = ET.Element("domainbackup", {"mode": "pull"})
        if since:
            ET.SubElement(backup, "incremental").text = since
        ET.SubElement(backup, "server", {"transport": "unix", "socket": str(sock)})
        bdisks = ET.SubElement(backup, "disks")
        self._scratch = []
        for d in self.vm.disks:
            if d.name in disks:
                scratch = self.vmdir / f"scratch-{d.target}.qcow2"
                scratch.unlink(missing_ok=True)   # libvirt creates (and labels) it
                self._scratch.append(scratch)
                attrs = {"name": d.target, "backup": "yes", "type": "file"}
                if since and not d.checkpointed:
                    attrs["backupmode"] = "full"      # scan-tracked: no checkpoint
                el = ET.SubElement(bdisks, "disk", attrs)
                ET.SubElement(el, "scratch", {"file": str(scratch)})
            else:
                ET.SubElement(bdisks, "disk", {"name": d.target, "backup": "no"})
        checkpoint = None
        if new:
            targets = {self.disks[x].target for x in disks if self.disks[x].checkpointed}
            if targets:
                checkpoint = self._checkpoint_xml(new, targets)
        try:
            self.dom.backupBegin(ET.tostring(backup, encoding="unicode"), checkpoint, 0)
        except libvirt.libvirtError as e:
            self._remove_scratch()
            code = e.get_error_code()
            if code in (libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT,
                        libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT):
                raise TrackingError(f"libvirt cannot back up {self.vm.name} from checkpoint "
                                    f"{since}: {lv_error(e)}") from None
            raise HypervisorError(f"libvirt could not freeze {self.vm.name}: {lv_error(e)}") from None
        self._backup = True
        exports = {}
        try:
            for x in disks:
                d = self.disks[x]
                size = int(self.dom.blockInfo(d.target)[0])
                exports[x] = Export(str(sock), d.target, size,
                                    f"qemu:dirty-bitmap:backup-{d.target}"
                                    if since and d.checkpointed else None)
        except libvirt.libvirtError as e:
            self.unexport()
            raise HypervisorError(f"libvirt: {lv_error(e)}") from None
        return exports

    def _freeze_off(self, disks: list[str], since: str | None,
                    new: str | None) -> dict[str, Export]:
        actions, temp = [], []
        targets = set()
        for x in disks:
            d = self.disks[x]
            if new and d.checkpointed:
                actions.append(qmpsteps.bitmap_add(x, new, persistent=True))
                targets.add(d.target)
            if since and d.checkpointed:
                # QEMU exports no enabled bitmap read-only: a frozen copy, named like libvirt's.
                tmp = f"backup-{d.target}"
                actions += [qmpsteps.bitmap_add(x, tmp, persistent=False, disabled=True),
                            qmpsteps.bitmap_merge(x, tmp, [since])]
                temp.append((x, tmp))
        try:
            qmpsteps.transaction(self.qmp, actions)
        except QMPError as e:
            if "exists" in e.desc.lower():
                raise HypervisorError(f"bitmap {new} already exists on {self.vm.name}: {e.desc}") from None
            raise
        self._temp = temp
        if new and targets:
            try:
                self._redefine_checkpoint(new, targets)
            except BaseException:
                qmpsteps.transaction(self.qmp, [qmpsteps.bitmap_remove(x, new) for x in disks
                                                if self.disks[x].target in targets])
                self._drop_temp()
                raise
        exports = {}
        try:
            nodes = self._nodes()
            for x in disks:
                d = self.disks[x]
                if x not in nodes:
                    raise HypervisorError(f"disk {x} of {self.vm.name} cannot be opened: "
                                          f"{d.path or 'it has no source'} is missing")
                bitmap = f"backup-{d.target}" if since and d.checkpointed else None
                qmpsteps.export_view(self.qmp, f"exp-{x}", x, d.target, bitmap)
                self._exports.append(f"exp-{x}")
                size = int(nodes[x].get("image", {}).get("virtual-size") or d.virtual_size)
                exports[x] = Export(self.nbd_socket, d.target, size,
                                    f"qemu:dirty-bitmap:{bitmap}" if bitmap else None,
                                    image=d.path, image_format=d.format)
        except BaseException:
            self.unexport()
            raise
        return exports

    # -- end of a frozen view --------------------------------------------------------------
    def settle(self, disks: list[str], new: str, tail: str) -> dict[str, Export]:
        raise Unsupported("libvirt block sessions have no live views to settle")

    def end_pause(self) -> None:
        """Nothing to resume: this session never pauses the guest."""

    def unexport(self) -> None:
        if self._backup:
            try:
                self.dom.abortJob()   # ends the pull backup: NBD server, scratch, temp bitmaps
            except libvirt.libvirtError as e:
                log.warning("ending the backup of %s: %s", self.vm.name, lv_error(e))
            self._wait_no_backup()
            self._backup = False
            self._remove_scratch()
            Path(self.nbd_socket).unlink(missing_ok=True)
        if self.qsd is not None:
            qmpsteps.drop_exports(self.qmp, self._exports, log)
            self._exports = []
            self._drop_temp()

    def _drop_temp(self) -> None:
        for node, name in self._temp:
            try:
                self.qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
            except HypervisorError as e:
                log.warning("removing bitmap %s: %s", name, e)
        self._temp = []

    def _wait_no_backup(self, timeout: float = 30.0) -> None:
        """Until libvirt has no backup job of the domain. abortJob returns at once and
        the job is gone 2-4 ms later on this machine: polled from 1 ms up (a cycle
        waits for it), at most every 50 ms."""
        deadline = time.monotonic() + timeout
        pause = 0.001
        while time.monotonic() < deadline:
            try:
                self.dom.backupGetXMLDesc(0)
            except libvirt.libvirtError:
                return    # no backup job any more
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        log.warning("the backup job of %s did not end within %.0f s", self.vm.name, timeout)

    def _remove_scratch(self) -> None:
        for p in self._scratch:
            p.unlink(missing_ok=True)
        self._scratch = []

    def _end_stale_backup(self) -> None:
        """A backup job ours left behind (daemon crash mid-cycle) blocks the next one."""
        try:
            xml = self.dom.backupGetXMLDesc(0)
        except libvirt.libvirtError:
            return
        if str(self.vmdir) in xml or self.nbd_socket in xml:
            log.warning("ending a backup job of %s left by an earlier run", self.vm.name)
            try:
                self.dom.abortJob()
            except libvirt.libvirtError as e:
                log.warning("ending it failed: %s", lv_error(e))
            self._wait_no_backup()
            for p in self.vmdir.glob("scratch-*.qcow2"):
                p.unlink(missing_ok=True)

    # -- end ---------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self.unexport()
        finally:
            if self.qsd is not None:
                self.qsd.close()
            if self.vm.existing:
                for d in (self.vmdir / "run", self.vmdir):
                    try:
                        d.rmdir()
                    except OSError:
                        pass    # (not empty: something of a running backup is left)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class BlockAccessPart(LibvirtBase):
    # libvirt's pull backup is its only frozen view, and libvirt refuses it beside the
    # mirror continuous mode runs: no live views (a DR link beside continuous mode needs
    # the qemu driver).
    live_views = False

    def block_session(self, name: str) -> LibvirtBlockSession:
        dom, _, vm = self._load(name)
        return LibvirtBlockSession(self, dom, vm)

    def disk_tracking(self, name: str) -> dict[str, str]:
        """Checkpoints for qcow2 image files; the hash scan for every other disk (a raw
        file, a block device: no persistent bitmap, and libvirt has no other tracking)."""
        _, _, vm = self._load(name)
        return {d.name: tracking.CHECKPOINT if d.checkpointed else tracking.SCAN
                for d in vm.disks}

    def close_idle(self) -> None:
        """Nothing is kept: a shut-off domain's session starts a storage daemon of its own."""

    def close_kept(self) -> None:
        """Nothing is kept between sessions."""

    def drop_left_views(self) -> list[str]:
        """Nothing to do at daemon start: a dead daemon's pull backup is ended by the next
        block session of its domain (LibvirtBlockSession._end_stale_backup)."""
        return []

    def io(self, name: str, disk: str, command: str) -> str:
        raise Unsupported("`vm io` needs the qemu driver (this host runs VMs under libvirt)")

    def checkpoints(self, name: str) -> list[str]:
        """libvirt's checkpoints of a VM, oldest first (for operators and tests)."""
        dom, _, _ = self._load(name)
        try:
            cps = dom.listAllCheckpoints(0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: {lv_error(e)}") from None
        return [c.getName() for c in sorted(cps, key=_creation_time)]


def _creation_time(cp) -> tuple[int, str]:
    try:
        root = ET.fromstring(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        return int(root.findtext("creationTime") or 0), cp.getName()
    except (libvirt.libvirtError, ET.ParseError, ValueError):
        return 0, cp.getName()
