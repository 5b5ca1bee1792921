"""The qemu driver's block session (``QemuBlockSession``): change-tracking access to a
VM's disks, QMP on the VM's QEMU while it runs (fleecing gives the frozen view; beside
continuous mode's mirror a live view that ``settle`` ends with the guest paused), a
qemu-storage-daemon over its disks while it is off. Bitmaps are per disk.

    HOME/run/<uuid8>-fleece-DISK.qcow2   a running VM's fleecing image (while a view is out)
    HOME/run/<uuid8>.nbd                 the NBD socket of a running VM's views
    HOME/run/atrest-PID.*                the storage daemon the sessions of powered-off VMs
                                         share (qemutools.atrest): their images are
                                         added at a session's start, removed at its end
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ...errors import HypervisorError
from ...qemutools import img, qmpsteps
from ...qemutools.atrest import Images
from ...qemutools.qmp import Monitor
from ...qemutools.qsd import image_node
from ..base import BitmapInfo, Export
from .files import QemuFiles

log = logging.getLogger("vmreplica.qemu")


class QemuBlockSession:
    """Change-tracking access to a VM's disks: QMP on the VM's QEMU while it runs (fleecing
    gives the frozen view), a qemu-storage-daemon over its disks while it is off."""

    per_disk_bitmaps = True   # a bitmap can be released on some disks and kept on others

    def __init__(self, driver: QemuFiles, desc: dict):
        self.driver = driver
        self.desc = desc
        self.short = desc["uuid"][:8]
        self.sizes = {d["name"]: int(d["virtual_size"]) for d in desc["disks"]}
        self.formats = {d["name"]: d["format"] for d in desc["disks"]}
        self.paths = {d["name"]: d["path"] for d in desc["disks"]}
        self.images: Images | None = None       # (powered off: in the at-rest daemon)
        self._exports: list[str] = []
        self._fleece: list[str] = []
        self._nbd_started = False
        self._paused_at: float | None = None
        self.live = False                  # the view is live and converges (settle())
        self.paused_seconds = 0.0          # how long settle() paused the guest
        self.running = driver._pid(desc) is not None
        self.mon: Monitor | Images
        # A disk's node and export names: in the VM's QEMU its own name; in the at-rest
        # daemon, which holds other VMs' disks too, prefixed with the VM's uuid.
        self.node = {d["name"]: d["name"] if self.running else f"v{self.short}-{d['name']}"
                     for d in desc["disks"]}
        if self.running:
            self.mon = Monitor(driver._rt(desc, "qmp"), timeout=60)
            self.nbd_socket = str(driver._rt(desc, "nbd"))
        else:
            blockdevs = []
            for d in desc["disks"]:
                blockdevs += image_node(d["path"], self.node[d["name"]], d["format"])
            self.images = driver.at_rest.attach(self.short, blockdevs)
            self.mon = self.images
            self.nbd_socket = self.images.nbd_socket

    # -- bitmaps -----------------------------------------------------------------------
    def bitmaps(self, disk: str) -> list[BitmapInfo]:
        nodes = self.mon.execute("query-named-block-nodes", {"flat": True})
        for n in nodes:
            if n.get("node-name") == self.node[disk]:
                # A block job's own bitmap (an active mirror's) has no name: not ours.
                return [BitmapInfo.from_qmp(b["name"], b)
                        for b in n.get("dirty-bitmaps", []) if b.get("name")]
        raise HypervisorError(f"VM {self.desc['name']} has no disk node {disk}")

    def _persistent(self, disk: str) -> bool:
        # A raw image cannot store a bitmap: it tracks while this QEMU runs, and a
        # restart (a missing bitmap) leads to a resynchronisation.
        return self.formats[disk] == "qcow2"

    # -- views -------------------------------------------------------------------------
    def freeze(self, disks: list[str], since: str | None, new: str | None) -> dict[str, Export]:
        """One transaction: start ``new``, stop ``since``, and (running VM) start fleecing."""
        actions: list[dict] = []
        for disk in disks:
            if new:
                actions.append(qmpsteps.bitmap_add(self.node[disk], new,
                                                   persistent=self._persistent(disk)))
            if since:
                actions.append(qmpsteps.bitmap_disable(self.node[disk], since))
        if self.running and self._mirrored(disks):
            # QEMU refuses a fleecing backup job on a disk an active mirror holds
            # (continuous mode): the view is live instead, and converges — what the guest
            # writes while it is read is recorded by ``new`` and read again, the guest
            # paused, by settle() (only those blocks: the pause is short).
            self.live = True
        elif self.running:
            for disk in disks:
                target = self._fleece_target(disk)
                actions.append({"type": "blockdev-backup",
                                "data": {"device": disk, "target": target, "sync": "none",
                                         "job-id": f"fleece-{disk}", "auto-dismiss": True}})
                self._fleece.append(disk)
        try:
            qmpsteps.transaction(self.mon, actions)
        except BaseException:
            self._drop_fleece()
            raise
        exports = {}
        if self.running and not self._nbd_started:
            Path(self.nbd_socket).unlink(missing_ok=True)
            self.mon.execute("nbd-server-start", {"addr": {"type": "unix",
                                                           "data": {"path": self.nbd_socket}}})
            self._nbd_started = True
        for disk in disks:
            node = f"fleece-{disk}" if disk in self._fleece else self.node[disk]
            exports[disk] = self._export(disk, node, self.node[disk], since)
        return exports

    def _export(self, disk: str, node: str, name: str, bitmap: str | None) -> Export:
        qmpsteps.export_view(self.mon, f"exp-{name}", node, name, bitmap)
        self._exports.append(f"exp-{name}")
        at_rest = not self.running            # the storage daemon serves the image as is
        return Export(self.nbd_socket, name, self.sizes[disk],
                      f"qemu:dirty-bitmap:{bitmap}" if bitmap else None,
                      image=self.paths[disk] if at_rest else None,
                      image_format=self.formats[disk] if at_rest else None)

    def end_pause(self) -> None:
        """Resume a guest settle() paused (unexport() does too, whatever happened)."""
        if self._paused_at is not None:
            try:
                self.mon.execute("cont")
                self.driver.pause_mark(self.desc).unlink(missing_ok=True)
            finally:
                self.paused_seconds += time.monotonic() - self._paused_at
                self._paused_at = None

    def settle(self, disks: list[str], new: str, tail: str) -> dict[str, Export]:
        """End a live view (see freeze): pause the guest, start ``tail``, stop ``new``,
        and export each disk with ``new``'s dirty map — the blocks written while the live
        view was read, to be read again now; end_pause() (or unexport()) resumes it."""
        if self.mon.execute("query-status").get("status") == "running":
            self.driver.pause_mark(self.desc).write_text(self.desc["name"])
            self.mon.execute("stop")
            self._paused_at = time.monotonic()
        qmpsteps.transaction(
            self.mon,
            [qmpsteps.bitmap_add(d, tail, persistent=self._persistent(d)) for d in disks] +
            [qmpsteps.bitmap_disable(d, new) for d in disks])
        return {d: self._export(d, d, f"{d}-tail", new) for d in disks}

    def _mirrored(self, disks: list[str]) -> bool:
        """An active mirror (continuous mode) holds one of these disks."""
        jobs = {j.get("device") for j in self.mon.execute("query-block-jobs") or []
                if j.get("type") == "mirror"}
        return any(f"mirror-{d}" in jobs for d in disks)

    def _fleece_target(self, disk: str) -> str:
        path = self.driver.run_dir / f"{self.short}-fleece-{disk}.qcow2"
        path.unlink(missing_ok=True)
        img.create(path, self.sizes[disk], "qcow2")
        self.mon.execute("blockdev-add", {
            "driver": "qcow2", "node-name": f"fleece-{disk}", "backing": disk,
            "file": {"driver": "file", "filename": str(path)}})
        return f"fleece-{disk}"

    def unexport(self) -> None:
        qmpsteps.drop_exports(self.mon, self._exports, log)
        self._exports = []
        self._drop_fleece()
        self.end_pause()
        if self._nbd_started:
            try:
                self.mon.execute("nbd-server-stop")
            except HypervisorError:
                pass
            self._nbd_started = False
            Path(self.nbd_socket).unlink(missing_ok=True)

    def _drop_fleece(self) -> None:
        for disk in self._fleece:
            try:
                self.mon.execute("block-job-cancel", {"device": f"fleece-{disk}", "force": True})
            except HypervisorError:
                pass
        for disk in self._fleece:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                jobs = self.mon.execute("query-block-jobs")
                if not any(j.get("device") == f"fleece-{disk}" for j in jobs):
                    break
                time.sleep(0.01)
            try:
                self.mon.execute("blockdev-del", {"node-name": f"fleece-{disk}"})
            except HypervisorError as e:
                log.warning("removing fleece node of %s: %s", disk, e)
            (self.driver.run_dir / f"{self.short}-fleece-{disk}.qcow2").unlink(missing_ok=True)
        self._fleece = []

    # -- bitmap operations -------------------------------------------------------------
    def add_bitmap(self, disks: list[str], name: str) -> None:
        """Start recording into a new bitmap (continuous mode rotates them). Idempotent: a
        disk that has it already (an earlier rotation stopped half-way) keeps it."""
        qmpsteps.transaction(self.mon, [qmpsteps.bitmap_add(self.node[d], name,
                                                            persistent=self._persistent(d))
                                        for d in disks
                                        if name not in {b.name for b in self.bitmaps(d)}])

    def release(self, disks: list[str], names: list[str]) -> None:
        """Remove bitmaps ``names`` from ``disks`` (those that exist)."""
        actions = []
        for disk in disks:
            have = {b.name for b in self.bitmaps(disk)}
            actions += [qmpsteps.bitmap_remove(self.node[disk], n) for n in names if n in have]
        qmpsteps.transaction(self.mon, actions)

    def restore(self, disks: list[str], since: str, new: str) -> None:
        """Undo a freeze: ``since`` records again and takes back what ``new`` recorded."""
        actions = []
        for disk in disks:
            have = {b.name for b in self.bitmaps(disk)}
            node = self.node[disk]
            if since in have:
                actions.append(qmpsteps.bitmap_enable(node, since))
                if new in have:
                    actions.append(qmpsteps.bitmap_merge(node, since, [new]))
            if new in have:
                actions.append(qmpsteps.bitmap_remove(node, new))
        qmpsteps.transaction(self.mon, actions)

    def merge(self, disks: list[str], target: str, sources: list[str]) -> None:
        """Fold ``sources`` into ``target`` (enabled) and remove them: a superset, never less."""
        actions = []
        for disk in disks:
            have = {b.name: b for b in self.bitmaps(disk)}
            srcs = [s for s in sources if s in have and s != target]
            node = self.node[disk]
            if target in have and not have[target].recording:
                actions.append(qmpsteps.bitmap_enable(node, target))
            if srcs:
                actions.append(qmpsteps.bitmap_merge(node, target, srcs))
                actions += [qmpsteps.bitmap_remove(node, s) for s in srcs]
        qmpsteps.transaction(self.mon, actions)

    def close(self) -> None:
        try:
            self.unexport()
        finally:
            if self.images is not None:
                self.images.close()          # (flushed, bitmaps stored: qemutools.atrest)
            else:
                self.mon.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
