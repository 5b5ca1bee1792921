"""The qemu driver's block access: block sessions (session.py), clearing at daemon start
what a dead daemon's session left in running VMs, and ``vm io`` (a qemu-io command
through the VM's own device, for benchmarks). Its sessions read a live, converging view
where fleecing is refused (beside continuous mode's mirror): QemuBlockSession.settle.
"""

from __future__ import annotations

import logging
import subprocess
import time

from ...domain import tracking
from ...domain.units import format_size
from ...errors import HypervisorError, NotFound, UsageError
from ...qemutools.qmp import Monitor
from .cmdline import qemu_error, read_from
from .inventory import Inventory
from .session import QemuBlockSession

log = logging.getLogger("vmreplica.qemu")

QEMU_IO = "qemu-io"
# Failures a null device gives that the VM's disk may not (it reads zeros).
_DRY_RUN_ONLY = ("Pattern verification failed",)


class BlockAccessPart(Inventory):
    live_views = True

    def block_session(self, name: str) -> QemuBlockSession:
        desc = self._load(name)
        return QemuBlockSession(self, desc)

    def disk_tracking(self, name: str) -> dict[str, str]:
        """Every disk has a bitmap: persistent in a qcow2 image; in a raw one only while
        its QEMU runs (QemuBlockSession._persistent), a restart resynchronises it."""
        return {d["name"]: tracking.BITMAP if d["format"] == "qcow2" else tracking.VOLATILE
                for d in self._load(name)["disks"]}

    def drop_left_views(self) -> list[str]:
        """At daemon start: remove what a dead daemon's block session left in its running
        VMs' QEMU — fleecing jobs and nodes, NBD exports and the NBD server (a daemon that
        starts holds no session). Left there, every later cycle of the VM failed
        ("Duplicate nodes with node-name='fleece-disk0'", "NBD server already running").
        Active mirrors (continuous mode) are not touched. The files of a dead daemon's
        at-rest storage daemon go too (qemutools.atrest)."""
        self.at_rest.sweep_stale()
        done = []
        for info in self.list_vms():
            if info.state != "running":
                continue
            try:
                desc = self._load(info.name)
                with self.monitor(info.name, timeout=30) as m:
                    left = _drop_views(m)
                for f in self.run_dir.glob(f"{desc['uuid'][:8]}-fleece-*.qcow2"):
                    f.unlink(missing_ok=True)
                if left:
                    done.append(info.name)
            except (HypervisorError, NotFound, OSError) as e:
                log.warning("clearing what a dead daemon left in %s: %s", info.name, e)
        return done

    def close_idle(self) -> None:
        self.at_rest.close_idle()

    def close_kept(self) -> None:
        self.at_rest.close()

    def io(self, name: str, disk: str, command: str) -> str:
        """Run a qemu-io command on a disk through the VM's own device (its guest-facing
        path, mirror included): for benchmarks; the VM needs `share_rw`.

        In the VM's monitor qemu-io prints its results and most of its complaints to
        QEMU's stdout, which a daemonized QEMU sends to /dev/null: a command qemu-io
        rejects would look like a success. So the command is first run by a qemu-io of
        our own against a null device of the disk's size (it parses it the same way and
        checks its ranges), and only an accepted one goes to the VM."""
        desc = self._load(name)
        disks = {d["name"]: d for d in desc["disks"]}
        if disk not in disks:
            raise NotFound(f"{name} has no disk {disk!r}",
                           hint=f"its disks: {', '.join(disks)}")
        command = command.strip()
        if not command or '"' in command:
            raise UsageError(f"not a qemu-io command: {command!r}",
                             hint='e.g. "write -P 1 0 4k" (`qemu-io -c help` lists them)')
        check_qemu_io(command, int(disks[disk]["virtual_size"]), f"{name}/{disk}")
        qemu_log = self._dir(name) / "qemu.log"
        log_from = qemu_log.stat().st_size if qemu_log.exists() else 0
        with self.monitor(name, timeout=300) as m:
            out = m.execute("human-monitor-command", {
                "command-line": f'qemu-io -d vd-{disk}/virtio-backend "{command}"'})
        said = qemu_error(read_from(qemu_log, log_from), keep=5)
        if out.strip().lower().startswith("error") or said:
            reason = (out.strip().removeprefix("Error:").strip() if out.strip() else said)
            raise HypervisorError(f"qemu-io failed on {name}/{disk}: {reason}",
                                  hint=f"QEMU's messages are in {qemu_log}")
        return out


def check_qemu_io(command: str, size: int, where: str) -> None:
    """Refuse a qemu-io command qemu-io itself rejects (unknown command, wrong
    arguments, a range past the disk's end), by running it on a null device of the
    same size."""
    try:
        proc = subprocess.run(
            [QEMU_IO, "--image-opts", f"driver=null-co,size={size},read-zeroes=on",
             "-c", command], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return       # no qemu-io here: nothing to check with; the VM's monitor decides
    except subprocess.TimeoutExpired:
        return
    if proc.returncode == 0:
        return
    said = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines()
            if ln.strip()]
    if said and all(any(ln.startswith(p) for p in _DRY_RUN_ONLY) or ln.startswith(
            ("read ", "wrote ", "discard ")) or " ops; " in ln for ln in said):
        return
    reason = "; ".join(ln for ln in said if " ops; " not in ln)[:500] or \
        f"exit {proc.returncode}"
    raise UsageError(f"qemu-io rejects {command!r} on {where} ({format_size(size)}): {reason}",
                     hint='e.g. "write -P 1 0 4k"; `qemu-io -c help` lists the commands')


def _drop_views(m: Monitor) -> bool:
    """Cancel fleecing jobs, delete exports, fleece nodes and the NBD server (see
    BlockAccessPart.drop_left_views); True if anything was there."""
    found = False
    fleece_jobs = [j["device"] for j in m.execute("query-block-jobs") or []
                   if str(j.get("device", "")).startswith("fleece-")]
    for job in fleece_jobs:
        found = True
        try:
            m.execute("block-job-cancel", {"device": job, "force": True})
        except HypervisorError:
            pass
    for e in m.execute("query-block-exports") or []:
        if str(e.get("id", "")).startswith("exp-"):
            found = True
            try:
                m.execute("block-export-del", {"id": e["id"], "mode": "hard"})
            except HypervisorError:
                pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        jobs = {j.get("device") for j in m.execute("query-block-jobs") or []}
        exports = {e.get("id") for e in m.execute("query-block-exports") or []}
        if not jobs & set(fleece_jobs) and not any(str(x).startswith("exp-") for x in exports):
            break
        time.sleep(0.02)
    for n in m.execute("query-named-block-nodes", {"flat": True}) or []:
        name = str(n.get("node-name", ""))
        if name.startswith("fleece-"):
            found = True
            m.execute("blockdev-del", {"node-name": name})
    try:
        m.execute("nbd-server-stop")
        found = True
    except HypervisorError:
        pass                                   # (none ran)
    return found
