"""The libvirt block session's checkpoints and their dirty bitmaps: which checkpoints
track which disks, the bitmaps on each disk's node, adding, releasing, restoring and
merging them. ``CheckpointOps`` is the half of ``block.LibvirtBlockSession`` that keeps
this bookkeeping (the other half exports frozen views).

Change tracking, as verified on libvirt 9.0 + QEMU 7.2:

- Every checkpoint's bitmap records from its creation onwards (they all stay enabled);
  an incremental backup from checkpoint C exports a frozen copy of C's bitmap
  (``backup-vdX``) while C goes on recording. Deleting a checkpoint just removes its
  bitmap (no merging into a parent). Checkpoints are named after the tracker's bitmaps;
  libvirt names each qcow2 bitmap after its checkpoint.
- ``restore(since, new)`` deletes checkpoint ``new``: ``since`` kept recording through
  the failed cycle, so the next cycle from ``since`` sees everything. ``merge(target,
  sources)`` ORs the sources' bits into ``target`` (a no-op for newer sources, which
  ``target`` covers) and deletes them.
- libvirt 9.0 cannot create or delete checkpoints of a shut-off domain (it says
  "cannot create/delete checkpoint for inactive domain"). While off, the session opens
  the images in a qemu-storage-daemon, adds/removes the persistent bitmaps there and
  keeps libvirt's metadata in step with ``checkpointCreateXML(REDEFINE)`` and
  ``delete(METADATA_ONLY)``; once the domain runs again libvirt uses those checkpoints
  like its own.
- A raw disk or a block device cannot hold a persistent bitmap (``DiskDef.checkpointed``
  is false): it gets ``checkpoint='no'``, ``bitmaps`` lists nothing on it, and the
  tracker compares it by hash scan instead.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET

import libvirt

from ...errors import HypervisorError
from ...qemutools import qmpsteps
from ...qemutools.qmpsteps import QMP
from ...qemutools.qsd import StorageDaemon
from ..base import BitmapInfo
from .connection import lv_error
from .domainxml import DiskDef, VMDef

log = logging.getLogger("vmreplica.libvirt")


class CheckpointOps:
    """Checkpoints and bitmaps of a domain's disks, over the session's QMP target (the
    domain's QEMU through libvirt while it runs, a storage daemon while it is off)."""

    dom: libvirt.virDomain
    vm: VMDef
    disks: dict[str, DiskDef]
    qsd: StorageDaemon | None
    qmp: QMP
    running: bool

    # -- nodes -------------------------------------------------------------------------
    def _nodes(self) -> dict[str, dict]:
        """vmreplica disk name → its format node (with ``dirty-bitmaps``)."""
        nodes = self.qmp.execute("query-named-block-nodes", {"flat": True})
        if self.qsd is not None:
            return {n["node-name"]: n for n in nodes if n.get("node-name") in self.disks}
        # libvirt's format node of each disk: the node whose image is the disk's file and
        # whose name is libvirt's own (filters such as copy-before-write are unnamed '#…')
        live = ET.fromstring(self.dom.XMLDesc(0))
        paths = {}
        for el in live.findall("devices/disk"):
            t, s = el.find("target"), el.find("source")
            if t is not None and s is not None:     # (a file's path, a block device's node)
                paths[t.get("dev")] = s.get("file") or s.get("dev")
        out = {}
        for d in self.disks.values():
            path = paths.get(d.target) or d.path
            for n in nodes:
                name = n.get("node-name", "")
                if (n.get("drv") in ("qcow2", "raw") and not name.startswith("#")
                        and n.get("image", {}).get("filename") == path):
                    out[d.name] = n
                    break
        return out

    def _node(self, disk: str) -> str:
        if self.qsd is not None:
            return disk
        n = self._nodes().get(disk)
        if n is None:
            raise HypervisorError(f"VM {self.vm.name} has no block node for disk {disk}")
        return n["node-name"]

    def _checkpoints(self) -> dict[str, dict[str, str]]:
        """checkpoint name → {target: bitmap name} for the disks it tracks."""
        out = {}
        try:
            cps = self.dom.listAllCheckpoints(0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: {lv_error(e)}") from None
        for cp in cps:
            try:
                root = ET.fromstring(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
            except libvirt.libvirtError:
                continue  # deleted meanwhile
            out[cp.getName()] = {d.get("name", ""): d.get("bitmap") or cp.getName()
                                 for d in root.findall("disks/disk")
                                 if d.get("checkpoint") == "bitmap"}
        return out

    # -- bitmaps -----------------------------------------------------------------------
    def _disk_bitmaps(self, disk: str, nodes: dict | None = None) -> dict[str, dict]:
        nodes = self._nodes() if nodes is None else nodes
        n = nodes.get(disk)
        if n is None:
            raise HypervisorError(f"VM {self.vm.name} has no disk node {disk}")
        return {b["name"]: b for b in n.get("dirty-bitmaps", []) if b.get("name")}

    def bitmaps(self, disk: str) -> list[BitmapInfo]:
        """The checkpoints tracking ``disk`` (inconsistent if their bitmap is broken or
        missing on the image), and persistent bitmaps on it that no checkpoint names
        (left by a crash between adding one and recording its checkpoint)."""
        d = self.disks.get(disk)
        if d is None:
            raise HypervisorError(f"VM {self.vm.name} has no disk {disk}")
        if not d.checkpointed:
            return []       # (a raw file or a block device: scan-tracked, no bitmap)
        on_disk = self._disk_bitmaps(disk)
        out, seen = [], set()
        for name, targets in sorted(self._checkpoints().items()):
            if d.target not in targets:
                continue
            b = on_disk.get(targets[d.target])
            seen.add(targets[d.target])
            if b is None:
                # (kept for the record: which bitmaps the disk's node has instead)
                log.warning("checkpoint %s of %s has no bitmap %s on disk %s; the disk's "
                            "bitmaps: %s", name, self.vm.name, targets[d.target], disk,
                            ", ".join(sorted(on_disk)) or "none")
                out.append(BitmapInfo(name, recording=False, persistent=True, inconsistent=True))
            else:
                out.append(BitmapInfo.from_qmp(name, b))
        for name, b in sorted(on_disk.items()):
            if name not in seen and b.get("persistent"):
                out.append(BitmapInfo.from_qmp(name, b))
        return out

    # -- checkpoints -------------------------------------------------------------------
    def _checkpoint_xml(self, name: str, targets: set[str], redefine: bool = False) -> str:
        root = ET.Element("domaincheckpoint")
        ET.SubElement(root, "name").text = name
        if redefine:
            ET.SubElement(root, "creationTime").text = str(int(time.time()))
        disks = ET.SubElement(root, "disks")
        for d in self.vm.disks:
            attrs = {"name": d.target, "checkpoint": "bitmap" if d.target in targets else "no"}
            if redefine and d.target in targets:
                attrs["bitmap"] = name
            ET.SubElement(disks, "disk", attrs)
        return ET.tostring(root, encoding="unicode")

    def _redefine_checkpoint(self, name: str, targets: set[str]) -> None:
        try:
            self.dom.checkpointCreateXML(self._checkpoint_xml(name, targets, redefine=True),
                                         libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt could not record checkpoint {name} of "
                                  f"{self.vm.name}: {lv_error(e)}") from None

    def add_bitmap(self, disks: list[str], name: str) -> None:
        """Start recording into a new checkpoint (continuous mode rotates them while the
        domain runs). Idempotent: a checkpoint of that name (an earlier rotation stopped
        half-way) is kept."""
        if self.qsd is not None:
            raise HypervisorError(f"VM {self.vm.name} is not running")
        targets = {self.disks[x].target for x in disks if self.disks[x].format == "qcow2"}
        if not targets or name in self._checkpoints():
            return
        try:
            self.dom.checkpointCreateXML(self._checkpoint_xml(name, targets), 0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt could not create checkpoint {name} of "
                                  f"{self.vm.name}: {lv_error(e)}") from None

    def release(self, disks: list[str], names: list[str]) -> None:
        """Delete checkpoints ``names`` with their bitmaps, and bitmaps of those names that
        no checkpoint records. A libvirt checkpoint spans disks: it goes as a whole (the
        tracker always passes the same disks to freeze and release)."""
        if not names:
            return
        cps = self._checkpoints()
        for name in names:
            if name in cps:
                self._delete_checkpoint(name, cps[name])
        nodes = self._nodes()
        actions = []
        for x in sorted(nodes):
            have = self._disk_bitmaps(x, nodes)
            actions += [qmpsteps.bitmap_remove(nodes[x]["node-name"], n)
                        for n in names if n in have]
        qmpsteps.transaction(self.qmp, actions)

    def _delete_checkpoint(self, name: str, targets: dict[str, str]) -> None:
        try:
            cp = self.dom.checkpointLookupByName(name)
        except libvirt.libvirtError:
            return
        if self.running:
            try:
                cp.delete(0)    # removes just this checkpoint's bitmaps
                return
            except libvirt.libvirtError as e:
                # libvirt refuses when a bitmap is gone from an image ("not found in
                # backing chain"): then only the metadata is left to drop. Anything else
                # (a busy bitmap, say) is an error.
                nodes = self._nodes()
                by_target = {d.target: d.name for d in self.vm.disks}
                missing = [t for t, b in targets.items() if by_target.get(t) in nodes
                           and b not in self._disk_bitmaps(by_target[t], nodes)]
                if not missing:
                    raise HypervisorError(f"libvirt could not delete checkpoint {name} of "
                                          f"{self.vm.name}: {lv_error(e)}") from None
                log.info("checkpoint %s of %s has no bitmap on %s: removing its metadata",
                         name, self.vm.name, ", ".join(missing))
        # Off (libvirt 9.0 cannot delete a checkpoint of an inactive domain): metadata
        # first, then the bitmaps (release() removes them) — a crash in between leaves a
        # plain bitmap the tracker folds in, never a checkpoint without its bitmap.
        try:
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt could not delete checkpoint {name} of "
                                  f"{self.vm.name}: {lv_error(e)}") from None

    def restore(self, disks: list[str], since: str, new: str) -> None:
        """Undo a freeze: drop checkpoint ``new``. In libvirt's model ``since`` recorded
        all along; should it not (a bitmap disabled by hand), ``new`` is folded into it."""
        nodes = self._nodes()
        actions = []
        for x in disks:
            have = self._disk_bitmaps(x, nodes) if x in nodes else {}
            s, n = have.get(since), have.get(new)
            if s and not s.get("recording") and not s.get("inconsistent"):
                node = nodes[x]["node-name"]
                actions.append(qmpsteps.bitmap_enable(node, since))
                if n and not n.get("inconsistent"):
                    actions.append(qmpsteps.bitmap_merge(node, since, [new]))
        qmpsteps.transaction(self.qmp, actions)
        self.release(disks, [new])

    def merge(self, disks: list[str], target: str, sources: list[str]) -> None:
        """Fold ``sources`` into ``target`` (recording) and delete them: a superset, never
        less. Sources newer than ``target`` add nothing (``target`` recorded their writes
        too); older ones add what they saw before ``target`` began."""
        nodes = self._nodes()
        actions = []
        srcs = [s for s in sources if s != target]
        for x in disks:
            have = self._disk_bitmaps(x, nodes) if x in nodes else {}
            t = have.get(target)
            if t is None or t.get("inconsistent"):
                continue
            node = nodes[x]["node-name"]
            if not t.get("recording"):
                actions.append(qmpsteps.bitmap_enable(node, target))
            good = [s for s in srcs if s in have and not have[s].get("inconsistent")]
            if good:
                actions.append(qmpsteps.bitmap_merge(node, target, good))
        qmpsteps.transaction(self.qmp, actions)
        if srcs:
            self.release(disks, srcs)
