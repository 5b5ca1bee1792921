"""The qemu driver's live collapse (replica.collapse): a failed-over VM started on its
chain with the base as the disk's node (cmdline.py, ``collapse_base``), the chain then
merged into the base by an active ``block-commit`` completed once ready; vm.json then
names the bases.
"""

from __future__ import annotations

import time

from ...errors import Conflict, HypervisorError
from ...qemutools.qmp import Monitor
from .files import QemuFiles


class CollapsePart(QemuFiles):
    def collapse_prepare(self, name: str, bases: dict[str, str]) -> None:
        """Before a failover starts ``name`` on a chain (overlay → layers → base): open each
        disk in ``bases`` with its base as the node named after the disk (the overlay is
        DISK-top, the layers between DISK-cN), so that once an active commit has merged
        the chain into the base and pivoted, the disk keeps the node name change tracking
        addresses it by. An empty ``bases`` clears it (a cancelled failover)."""
        desc = self._load(name)
        for d in desc["disks"]:
            if bases.get(d["name"]):
                d["collapse_base"] = str(bases[d["name"]])
            else:
                d.pop("collapse_base", None)
        self._save(desc)

    def collapse_live(self, name: str, bases: dict[str, str], timeout: float = 3600.0,
                      poll: float = 0.05) -> dict[str, int]:
        """Merge each disk's whole chain into its base while the VM runs: an active
        ``block-commit`` (job collapse-DISK) from DISK-top into DISK, completed (the pivot)
        once it is ready. Starts the jobs or takes over the ones running (a daemon that
        died mid-job); a disk whose device already sits on its base is done. The monitor
        is held only for each short look (cycles and checks use it too). Returns {disk:
        bytes the job copied}. Raises Conflict if the VM stops meanwhile (the caller then
        commits offline: what QEMU merged so far is merged again, the same bytes)."""
        desc = self._load(name)
        if not self._pid(desc):
            raise Conflict(f"VM {name} is not running")
        disks = sorted(bases)
        copied = {d: 0 for d in disks}
        deadline = time.monotonic() + timeout
        started = False
        while True:
            if not self._pid(desc):
                raise Conflict(f"VM {name} stopped while its disks were being collapsed")
            with self.monitor(name, timeout=30) as m:
                roots = _device_roots(m, disks)
                jobs = {j.get("id") or j.get("device"): j for j in m.execute("query-jobs")}
                bjobs = {j["device"]: j for j in m.execute("query-block-jobs")}
                pending = [d for d in disks if roots.get(d) != d]
                for d in disks:
                    job = jobs.get(f"collapse-{d}")
                    if job is not None and job.get("status") == "concluded":
                        m.execute("job-dismiss", {"id": f"collapse-{d}"})
                        if job.get("error"):
                            raise HypervisorError(f"collapsing {name}/{d} failed: {job['error']}")
                if not pending:
                    _drop_merged_nodes(m, name, disks)
                    return copied
                for d in pending:
                    if roots.get(d) != f"{d}-top":
                        raise HypervisorError(
                            f"{name}/{d} was not started for a live collapse (its device sits "
                            f"on {roots.get(d)!r})", hint="stop the VM: it is then collapsed "
                                                          "offline")
                    job = bjobs.get(f"collapse-{d}")
                    if job is None and f"collapse-{d}" not in jobs:
                        if started:
                            raise HypervisorError(f"the collapse job of {name}/{d} ended "
                                                  "without merging the chain")
                        m.execute("block-commit", {"job-id": f"collapse-{d}",
                                                   "device": f"{d}-top", "base-node": d,
                                                   "auto-dismiss": False})
                    elif job is not None:
                        copied[d] = max(copied[d], int(job.get("len", 0)))
                        if job.get("ready") and job.get("status") == "ready":
                            m.execute("job-complete", {"id": f"collapse-{d}"})
                started = True
            if time.monotonic() > deadline:
                raise HypervisorError(f"collapsing the disks of {name} took over {timeout:.0f} s",
                                      hint="the jobs go on in QEMU; the next attempt takes "
                                           "them over")
            time.sleep(poll)

    def collapse_done(self, name: str, bases: dict[str, str]) -> None:
        """The chains are merged: the VM's disks are their bases from now on."""
        desc = self._load(name)
        for d in desc["disks"]:
            if d["name"] in bases:
                d["path"] = str(bases[d["name"]])
                d.pop("collapse_base", None)
        self._save(desc)


def _drop_merged_nodes(m: Monitor, name: str, disks: list[str]) -> None:
    """After the pivot the chain's old nodes (DISK-top, DISK-cN: opened with -blockdev,
    so owned by the monitor) stay in QEMU and keep DISK as their backing child, so DISK
    is no root node and a mirror of it is refused ("Need a root block node"): delete
    them, the top first."""
    names = {n.get("node-name") for n in m.execute("query-named-block-nodes", {"flat": True})}
    for d in disks:
        layers = sorted((n for n in names if n and n.startswith(f"{d}-c")
                         and n[len(d) + 2:].isdigit()), key=lambda n: -int(n[len(d) + 2:]))
        for node in ([f"{d}-top"] if f"{d}-top" in names else []) + layers:
            try:
                m.execute("blockdev-del", {"node-name": node})
            except HypervisorError as e:
                raise HypervisorError(f"collapsing {name}/{d}: the merged node {node} could "
                                      f"not be removed: {e}") from None


def _device_roots(m: Monitor, disks: list[str]) -> dict[str, str | None]:
    """{disk: the node its guest device sits on} (devices vd-DISK)."""
    out = {}
    for b in m.execute("query-block"):
        qdev, inserted = b.get("qdev") or "", b.get("inserted") or {}
        for d in disks:
            if qdev.startswith(f"/machine/peripheral/vd-{d}/") and inserted:
                out[d] = inserted.get("node-name")
    return out
