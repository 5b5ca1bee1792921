"""The qemu driver's inventory, power and save/restore: this host's VMs (the folders
with a vm.json), creating and defining them, their disks, labels and owned files,
deleting them; starting their QEMU (cmdline.py), stopping, pausing and resuming it; and
the cluster's `save` stop mode (the running VM migrated into a file, QEMU ended; the
next start resumes from it). Save/restore lives here, not with the guest agent as on
the libvirt driver, because it is a stop and a start: ``save`` ends QEMU, ``start``
resumes a saved VM.

    HOME/vms/NAME/diskN.qcow2     disks made by `vm create` (a replica's disks live in
                                  the replica store instead; vm.json points at them)
    HOME/vms/NAME/console.log     the serial console
    HOME/vms/NAME/qemu.log        QEMU's own messages (its stderr once daemonized)
    HOME/vms/NAME/saved.state     a saved VM's memory and device state

A VM keeps running when the daemon stops or dies (as with any hypervisor); the daemon
finds it again by its pid file and uuid. The accelerator is `kvm`, `tcg` or `auto`:
`auto` uses KVM only after proving once that a guest boots under it on this machine
(hypervisor.kvmprobe).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

from ...errors import Conflict, HypervisorError, NotFound, Unsupported, UsageError
from ...qemutools import img
from ...qemutools.qmp import Monitor
from .. import kvmprobe
from ..base import VMInfo
from ..guest import guest_files
from .agent import GuestAgentPart
from .cmdline import command, qemu_error, written_since

log = logging.getLogger("vmreplica.qemu")


class Inventory(GuestAgentPart):
    # -- inventory -------------------------------------------------------------------
    def list_vms(self) -> list[VMInfo]:
        out = []
        if self.vms_dir.exists():
            for d in sorted(self.vms_dir.iterdir()):
                if (d / "vm.json").exists():
                    out.append(self._info(self._load(d.name)))
        return out

    def inspect(self, name: str) -> VMInfo:
        return self._info(self._load(name))

    def describe(self, name: str) -> dict:
        """Portable description: what another host needs to define the same VM."""
        desc = self._load(name)
        return {"name": desc["name"], "uuid": desc["uuid"], "memory_mb": desc["memory_mb"],
                "guest": desc.get("guest"), "agent": bool(desc.get("agent")),
                "network": desc.get("network") or "none",
                "disks": [{"name": d["name"], "format": d["format"],
                           "virtual_size": int(d["virtual_size"])} for d in desc["disks"]]}

    def exists(self, name: str) -> bool:
        return (self._dir(name) / "vm.json").exists()

    # -- create / define / delete ----------------------------------------------------
    def create_vm(self, name: str, sizes: list[int], memory_mb: int = 256,
                  guest: str | None = None, disk_format: str = "qcow2",
                  share_rw: bool = False) -> VMInfo:
        if self.exists(name):
            raise Conflict(f"a VM named {name} already exists on this host")
        if disk_format not in ("qcow2", "raw"):
            raise UsageError(f"unsupported disk format {disk_format!r}", hint="use qcow2 or raw")
        if guest is not None:
            guest_files(guest)  # fails clearly if the demo guest was not built
        d = self._dir(name)
        d.mkdir(parents=True)
        try:
            disks = []
            for i, size in enumerate(sizes):
                path = d / f"disk{i}.{disk_format}"
                img.create(path, size, disk_format)
                disks.append({"name": f"disk{i}", "path": str(path), "format": disk_format,
                              "virtual_size": size})
            desc = {"name": name, "uuid": str(uuidlib.uuid4()), "memory_mb": memory_mb,
                    "guest": guest, "agent": guest is not None, "disks": disks,
                    "created_at": time.time(), "share_rw": share_rw}
            self._save(desc)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        return self._info(desc)

    def define_vm(self, desc: dict) -> VMInfo:
        """Define a VM whose disks already exist (a replica, a failed-over VM)."""
        name = desc["name"]
        if desc.get("definition"):
            raise Unsupported(f"{name} is a libvirt domain: its whole definition (CPU, "
                              "firmware, NICs) can be carried only to a host that runs the "
                              "libvirt driver",
                              hint="replicate it to a host whose home was made with "
                                   "`vmreplica init --driver libvirt`")
        if self.exists(name):
            raise Conflict(f"a VM named {name} already exists on this host")
        for d in desc["disks"]:
            if not d.get("path"):
                raise UsageError(f"disk {d['name']} of {name} has no path")
        self._dir(name).mkdir(parents=True)
        full = {"name": name, "uuid": desc.get("uuid") or str(uuidlib.uuid4()),
                "memory_mb": int(desc.get("memory_mb") or 256), "guest": desc.get("guest"),
                "agent": bool(desc.get("agent")), "created_at": time.time(),
                "network": desc.get("network") or "none",
                # Files and folders outside the VM folder that belong to this VM and go
                # with it when it is deleted (a replica's storage, say).
                "owns": [str(p) for p in desc.get("owns") or []],
                "disks": [{"name": d["name"], "path": str(d["path"]),
                           "format": d.get("format", "qcow2"),
                           "virtual_size": int(d["virtual_size"])} for d in desc["disks"]]}
        self._save(full)
        return self._info(full)

    def set_disks(self, name: str, disks: dict[str, str]) -> None:
        """Point disks of a defined VM at other images (e.g. a test-failover overlay)."""
        desc = self._load(name)
        for d in desc["disks"]:
            if d["name"] in disks:
                d["path"] = str(disks[d["name"]])
        self._save(desc)

    def replace_disks(self, name: str, disks: list[dict]) -> None:
        """Give a stopped VM another list of disks ({name, path, format, virtual_size}),
        in guest order (a replica whose set of replicated disks changed)."""
        desc = self._load(name)
        if self._pid(desc):
            raise Conflict(f"VM {name} is running")
        desc["disks"] = [{"name": d["name"], "path": str(d["path"]),
                          "format": d.get("format", "qcow2"),
                          "virtual_size": int(d["virtual_size"])} for d in disks]
        self._save(desc)

    def set_title(self, name: str, title: str, description: str | None = None) -> None:
        """No tool of the host shows labels of this driver's VMs: kept in vm.json."""
        desc = self._load(name)
        desc["title"] = " ".join(title.split())
        if description is not None:
            desc["description"] = description
        self._save(desc)

    def add_owned(self, name: str, paths: list[str]) -> None:
        """Files or folders that belong to the VM from now on (deleted with it)."""
        desc = self._load(name)
        desc["owns"] = sorted(set(desc.get("owns") or []) | set(paths))
        self._save(desc)

    def delete(self, name: str) -> None:
        desc = self._load(name)
        if self._pid(desc):
            raise Conflict(f"VM {name} is running", hint=f"stop it first: `vmreplica vm stop {name}`")
        for ext in ("pid", "qmp", "qmp2", "qmpc", "qga", "nbd"):
            self._rt(desc, ext).unlink(missing_ok=True)
        for owned in desc.get("owns") or []:
            p = Path(owned)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        shutil.rmtree(self._dir(name))

    # -- power -----------------------------------------------------------------------
    def accelerator(self) -> str:
        # Not memoized: the machine's remembered answer is read at each start (a stat and
        # a small file), so `host probe-kvm` or a QEMU upgrade counts at the next start.
        return kvmprobe.resolve(self.accel_setting, Path(self.home) / "run")

    def start(self, name: str) -> None:
        desc = self._load(name)
        if self._pid(desc):
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for ext in ("pid", "qmp", "qmp2", "qmpc", "qga"):
            self._rt(desc, ext).unlink(missing_ok=True)
        for d in desc["disks"]:
            if not Path(d["path"]).exists():
                raise HypervisorError(f"disk {d['name']} of {name} is missing: {d['path']}")
        console = self._dir(name) / "console.log"
        for log_file in (console, self._dir(name) / "qemu.log"):
            if log_file.exists() and log_file.stat().st_size > (8 << 20):
                log_file.unlink()
        saved = self.saved_state(name)
        args = command(desc, self.accelerator(), lambda ext: self._rt(desc, ext),
                       self._dir(desc["name"])) + (["-incoming", "defer"] if saved else [])
        qemu_log = self._dir(name) / "qemu.log"
        started_at = time.time()
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            # With -D, QEMU writes its own error to qemu.log (which it empties as it
            # opens it), not to stderr.
            reason = (qemu_error(proc.stderr) or qemu_error(written_since(qemu_log, started_at))
                      or f"exit {proc.returncode}")
            if "lock" in reason.lower():
                reason += " (a replication cycle or another process holds the disk)"
            raise HypervisorError(f"QEMU could not start {name}: {reason}",
                                  hint=f"QEMU's messages are in {qemu_log}")
        if not self._pid(desc):
            reason = qemu_error(written_since(qemu_log, started_at))
            raise HypervisorError(f"QEMU started {name} but exited at once"
                                  + (f": {reason}" if reason else ""),
                                  hint=f"see {console} and {qemu_log}")
        if saved:
            self._restore(name, saved)

    def stop(self, name: str, force: bool = False, timeout: float = 60.0) -> None:
        """Shut down cleanly (guest agent, then ACPI), power off after ``timeout``; --force: at once."""
        desc = self._load(name)
        pid = self._pid(desc)
        if not pid:
            return
        if not force:
            asked = False
            if desc.get("agent"):
                try:
                    self.agent_command(name, "guest-shutdown", timeout=3, expect_reply=False)
                    asked = True
                except HypervisorError:
                    pass
            if not asked:
                try:
                    with Monitor(self._rt(desc, "qmp"), timeout=5) as mon:
                        mon.execute("system_powerdown")
                except HypervisorError:
                    pass
            if _wait_gone(pid, timeout):
                return
            log.warning("%s did not shut down within %.0f s: powering it off", name, timeout)
        try:
            with Monitor(self._rt(desc, "qmp"), timeout=10, connect_timeout=5) as mon:
                mon.execute("quit")
        except HypervisorError:
            pass
        if not _wait_gone(pid, 15):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 10)

    def pause(self, name: str) -> None:
        desc = self._load(name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.pause_mark(desc).write_text(name)
        with self.monitor(name, timeout=30) as m:
            m.execute("stop")

    def resume(self, name: str) -> None:
        with self.monitor(name, timeout=30) as m:
            m.execute("cont")
        self.pause_mark(self._load(name)).unlink(missing_ok=True)

    def resume_left_paused(self) -> list[str]:
        """At daemon start: resume the guests a dead daemon left paused (a cycle's
        settle(), continuous mode's hand-over: see pause_mark)."""
        done = []
        for mark in self.run_dir.glob("*.paused-by-vmreplica"):
            name = mark.read_text().strip()
            try:
                desc = self._load(name)
                if self._pid(desc) is not None:
                    with self.monitor(name, timeout=30) as m:
                        if m.execute("query-status").get("status") == "paused":
                            m.execute("cont")
                            done.append(name)
            except (HypervisorError, NotFound) as e:
                log.warning("resuming %s, left paused: %s", name, e)
            mark.unlink(missing_ok=True)
        return done

    # -- save / restore (the cluster's `save` stop mode) -----------------------------
    def saved_state(self, name: str) -> Path | None:
        p = self._dir(name) / "saved.state"
        return p if p.exists() else None

    def save(self, name: str, timeout: float = 300.0) -> Path:
        """Save the running VM's memory and device state to a file, then end QEMU (disks
        flushed, bitmaps stored); the next start resumes from it."""
        path = self._dir(name) / "saved.state"
        tmp = path.with_suffix(".part")
        with self.monitor(name, timeout=60) as m:
            m.execute("stop")
            m.execute("migrate", {"uri": f"exec:cat > {tmp}"})
            deadline = time.monotonic() + timeout
            while True:
                st = m.execute("query-migrate").get("status")
                if st == "completed":
                    break
                if st in ("failed", "cancelled") or time.monotonic() > deadline:
                    m.execute("cont")
                    tmp.unlink(missing_ok=True)
                    raise HypervisorError(f"saving the state of {name} failed ({st})")
                time.sleep(0.05)
            os.replace(tmp, path)
        self.stop(name, force=True)
        return path

    def _restore(self, name: str, path: Path, timeout: float = 300.0) -> None:
        with self.monitor(name, timeout=60) as m:
            m.execute("migrate-incoming", {"uri": f"exec:cat {path}"})
            deadline = time.monotonic() + timeout
            while m.execute("query-status").get("status") in ("inmigrate", "prelaunch"):
                if time.monotonic() > deadline:
                    raise HypervisorError(f"resuming {name} from its saved state timed out")
                time.sleep(0.05)
            m.execute("cont")
        path.unlink(missing_ok=True)

    def discard_saved(self, name: str) -> None:
        p = self._dir(name) / "saved.state"
        p.unlink(missing_ok=True)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie (our own child) counts as gone.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.05)
    return False
