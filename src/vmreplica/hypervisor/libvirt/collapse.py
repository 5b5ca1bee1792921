"""The libvirt driver's live collapse (replica.collapse): a failed-over VM's chain
(overlay → layers → base) merged into its base while the domain runs, by an active
virDomainBlockCommit pivoted once ready; the persistent definition then names the bases.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import libvirt

from ...errors import Conflict, HypervisorError
from .connection import LibvirtBase, lv_error
from .domainxml import repoint_disks


class CollapsePart(LibvirtBase):
    def collapse_prepare(self, name: str, bases: dict[str, str]) -> None:
        """Nothing to prepare: libvirt names the nodes and follows a pivot itself."""

    def _live_disks(self, dom: libvirt.virDomain
                    ) -> dict[str, tuple[str | None, ET.Element | None]]:
        """{target: (source file, its <mirror> element or None)} from the live XML."""
        out = {}
        for el in ET.fromstring(dom.XMLDesc(0)).findall("devices/disk"):
            t, src = el.find("target"), el.find("source")
            if t is not None:
                out[t.get("dev", "")] = (src.get("file") if src is not None else "", el.find("mirror"))
        return out

    def collapse_live(self, name: str, bases: dict[str, str], timeout: float = 3600.0,
                      poll: float = 0.05) -> dict[str, int]:
        """Merge each disk's whole chain into its base while the VM runs: an active
        virDomainBlockCommit into the base, pivoted (blockJobAbort PIVOT) once libvirt
        says it is ready. Takes over a job that runs already (a daemon that died mid-job);
        a disk whose live source is its base is done. Returns {disk: bytes the job
        copied}; Conflict if the VM stops meanwhile (see the qemu driver)."""
        dom, _, vm = self._load(name)
        targets = {d.name: d.target for d in vm.disks if d.name in bases}
        copied = {d: 0 for d in targets}
        deadline = time.monotonic() + timeout
        started: set[str] = set()
        while True:
            if not self._active(dom):
                raise Conflict(f"VM {name} stopped while its disks were being collapsed")
            live = self._live_disks(dom)
            pending = [d for d, t in targets.items() if live.get(t, ("", None))[0] != bases[d]]
            if not pending:
                return copied
            for d in pending:
                t = targets[d]
                try:
                    info = dom.blockJobInfo(t, 0)
                    if not info:
                        if d in started:
                            raise HypervisorError(f"the collapse job of {name}/{d} ended "
                                                  "without merging the chain")
                        dom.blockCommit(t, bases[d], None, 0,
                                        libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
                        started.add(d)
                        continue
                    started.add(d)
                    copied[d] = max(copied[d], int(info.get("end", 0)))
                    mirror = live[t][1]
                    if mirror is not None and mirror.get("ready") == "yes":
                        dom.blockJobAbort(t, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                except libvirt.libvirtError as e:
                    raise HypervisorError(f"collapsing {name}/{d}: {lv_error(e)}") from None
            if time.monotonic() > deadline:
                raise HypervisorError(f"collapsing the disks of {name} took over {timeout:.0f} s",
                                      hint="the jobs go on in QEMU; the next attempt takes "
                                           "them over")
            time.sleep(poll)

    def collapse_done(self, name: str, bases: dict[str, str]) -> None:
        """The chains are merged: the persistent definition names the bases (libvirt has
        moved the live one at the pivot)."""
        _, root, vm = self._load(name)
        repoint_disks(root, vm, bases)
        self._redefine(root, vm)
