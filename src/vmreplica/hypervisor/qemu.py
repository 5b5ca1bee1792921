"""The embedded `qemu` driver: VMs are QEMU processes this host starts itself, controlled
over QMP. No other daemon needed.

    HOME/vms/NAME/vm.json         the VM's description (name, uuid, memory, disks, guest)
    HOME/vms/NAME/diskN.qcow2     disks made by `vm create` (a replica's disks live in
                                  the replica store instead; vm.json points at them)
    HOME/run/<id>.{qmp,qga,pid,nbd}, HOME/vms/NAME/console.log   runtime files
    HOME/vms/NAME/qemu.log        QEMU's own messages (its stderr once daemonized)

A VM keeps running when the daemon stops or dies (as with any hypervisor); the daemon
finds it again by its pid file and uuid. The accelerator is `kvm`, `tcg` or `auto`:
`auto` uses KVM only after proving once that a guest boots under it on this machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid as uuidlib
from pathlib import Path

from ..errors import Conflict, HypervisorError, NotFound, UsageError
from ..qemutools import img
from ..qemutools.qmp import Monitor
from ..qemutools.qsd import StorageDaemon, qcow2_node
from .base import QUIET_CANCEL_GUARD, BitmapInfo, DiskInfo, Export, VMInfo, active_mirror
from .guest import guest_files

log = logging.getLogger("vmreplica.qemu")

QEMU = "qemu-system-x86_64"


def _read_from(path: Path, offset: int) -> str:
    """What a log file gained after ``offset`` (at most its last 64 KiB)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < offset:       # emptied and written again meanwhile
                offset = 0
            f.seek(max(offset, size - 65536))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _written_since(path: Path, since: float) -> str:
    """A log QEMU (re)wrote since ``since`` (its last 64 KiB), else ""."""
    try:
        if path.stat().st_mtime < since - 1.0:     # coarse timestamps
            return ""
    except OSError:
        return ""
    return _read_from(path, 0)


def qemu_error(text: str, keep: int = 3) -> str:
    """The last meaningful lines of QEMU's own error output, joined: its messages
    ("qemu-system-x86_64: ...: reason") without the program name, blank lines and
    repeats dropped; the lines of the last message block only."""
    prog = QEMU + ":"
    lines = []
    for ln in (text or "").splitlines():
        ln = ln.strip()
        if ln.startswith(prog):
            ln = ln[len(prog):].strip()
        if ln and ln not in lines:
            lines.append(ln)
    return "; ".join(lines[-keep:])


QEMU_IO = "qemu-io"
# Failures a null device gives that the VM's disk may not (it reads zeros).
_DRY_RUN_ONLY = ("Pattern verification failed",)


def _check_qemu_io(command: str, size: int, where: str) -> None:
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
    raise UsageError(f"qemu-io rejects {command!r} on {where} ({_size_text(size)}): {reason}",
                     hint='e.g. "write -P 1 0 4k"; `qemu-io -c help` lists the commands')


def _size_text(n: int) -> str:
    from ..domain.units import format_size
    return format_size(n)


class QemuDriver:
    name = "qemu"

    def __init__(self, home: Path, config: dict):
        self.home = Path(home)
        self.vms_dir = self.home / "vms"
        self.run_dir = self.home / "run"
        self.accel_setting = config.get("accel") or "auto"

    # -- files -----------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.vms_dir / name

    def _load(self, name: str) -> dict:
        try:
            return json.loads((self._dir(name) / "vm.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"no VM named {name} on this host",
                           hint="`vmreplica vm list` shows the VMs of this host") from None

    def _save(self, desc: dict) -> None:
        d = self._dir(desc["name"])
        tmp = d / "vm.json.tmp"
        tmp.write_text(json.dumps(desc, indent=2, sort_keys=True))
        os.replace(tmp, d / "vm.json")

    def _rt(self, desc: dict, ext: str) -> Path:
        return self.run_dir / f"{desc['uuid'][:8]}.{ext}"

    def _pid(self, desc: dict) -> int | None:
        try:
            pid = int(self._rt(desc, "pid").read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if desc["uuid"].encode() in cmdline else None

    def _info(self, desc: dict) -> VMInfo:
        pid = self._pid(desc)
        return VMInfo(
            name=desc["name"], uuid=desc["uuid"], state="running" if pid else "stopped",
            memory_mb=desc["memory_mb"], guest=desc.get("guest"), pid=pid,
            agent=bool(desc.get("agent")),
            disks=[DiskInfo(d["name"], d["path"], d["format"], int(d["virtual_size"]))
                   for d in desc["disks"]])

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
        return resolve_accel(self.accel_setting, self.home)

    def _command(self, desc: dict) -> list[str]:
        accel = self.accelerator()
        args = [QEMU, "-name", f"{desc['name']},process=vmreplica-{desc['name']}",
                "-uuid", desc["uuid"], "-machine", f"pc,accel={accel}", "-m", str(desc["memory_mb"]),
                "-smp", "1", "-nodefaults", "-display", "none", "-no-user-config",
                "-daemonize", "-pidfile", str(self._rt(desc, "pid")),
                # Daemonized, QEMU's stderr goes to /dev/null unless -D names a log: an
                # abort's last words (a failed assertion, glibc's heap checks) land here.
                "-D", str(self._dir(desc["name"]) / "qemu.log"),
                "-chardev", f"socket,id=qmp,path={self._rt(desc, 'qmp')},server=on,wait=off",
                "-mon", "chardev=qmp,mode=control",
                # A second monitor for the continuous-mode watchdog (out-of-band capable).
                "-chardev", f"socket,id=qmp2,path={self._rt(desc, 'qmp2')},server=on,wait=off",
                "-mon", "chardev=qmp2,mode=control",
                # A third for the cluster's VM checker, so a check never waits for a cycle.
                "-chardev", f"socket,id=qmpc,path={self._rt(desc, 'qmpc')},server=on,wait=off",
                "-mon", "chardev=qmpc,mode=control",
                "-serial", f"file:{self._dir(desc['name']) / 'console.log'}"]
        if desc.get("network") == "isolated":
            # User-mode networking with restrict=on: a NIC that reaches nothing outside.
            args += ["-nic", "user,model=virtio-net-pci,restrict=on"]
        else:
            args += ["-nic", "none"]
        if accel == "kvm":
            args += ["-cpu", "host"]
        if desc.get("guest"):
            files = guest_files(desc["guest"])
            args += ["-kernel", str(files["kernel"]), "-initrd", str(files["initrd"]),
                     "-append", files["cmdline"], "-no-reboot"]
        if desc.get("agent"):
            args += ["-device", "virtio-serial-pci,id=vser0",
                     "-chardev", f"socket,id=qga0,path={self._rt(desc, 'qga')},server=on,wait=off",
                     "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        for d in desc["disks"]:
            node = d["name"]
            args += ["-blockdev", json.dumps({"driver": "file", "filename": d["path"],
                                              "node-name": f"{node}-file", "discard": "unmap"}),
                     "-blockdev", json.dumps({"driver": d["format"], "file": f"{node}-file",
                                              "node-name": node, "discard": "unmap"}),
                     "-device", f"virtio-blk-pci,drive={node},id=vd-{node},serial={node}"
                     + (",share-rw=on" if desc.get("share_rw") else "")]
        return args

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
        command = self._command(desc) + (["-incoming", "defer"] if saved else [])
        qemu_log = self._dir(name) / "qemu.log"
        started_at = time.time()
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            # With -D, QEMU writes its own error to qemu.log (which it empties as it
            # opens it), not to stderr.
            reason = (qemu_error(proc.stderr) or qemu_error(_written_since(qemu_log, started_at))
                      or f"exit {proc.returncode}")
            if "lock" in reason.lower():
                reason += " (a replication cycle or another process holds the disk)"
            raise HypervisorError(f"QEMU could not start {name}: {reason}",
                                  hint=f"QEMU's messages are in {qemu_log}")
        if not self._pid(desc):
            reason = qemu_error(_written_since(qemu_log, started_at))
            raise HypervisorError(f"QEMU started {name} but exited at once"
                                  + (f": {reason}" if reason else ""),
                                  hint=f"see {console} and {qemu_log}")
        if saved:
            self._restore(name, saved)

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

    def check(self, name: str) -> dict:
        """The VM checker's view: process, QMP run state, guest agent (if it has one)."""
        desc = self._load(name)
        pid = self._pid(desc)
        out = {"process": bool(pid), "qmp": None, "agent": None, "uptime": None}
        if not out["process"]:
            return out
        out["uptime"] = _process_age(pid)
        try:
            with Monitor(self._rt(desc, "qmpc"), timeout=5, connect_timeout=3) as m:
                out["qmp"] = m.execute("query-status").get("status")
        except HypervisorError as e:
            out["qmp"] = f"error: {e.message}"
        if desc.get("agent"):
            try:
                agent_call(self._rt(desc, "qga"), "guest-ping", None, 5)
                out["agent"] = "ok"
            except HypervisorError as e:
                out["agent"] = f"error: {e.message}"
        return out

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

    def monitor(self, name: str, timeout: float = 30.0) -> Monitor:
        desc = self._load(name)
        if not self._pid(desc):
            raise Conflict(f"VM {name} is not running")
        return Monitor(self._rt(desc, "qmp"), timeout=timeout)

    # -- continuous mode: an active mirror into the replica's export ---------------------
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
        _check_qemu_io(command, int(disks[disk]["virtual_size"]), f"{name}/{disk}")
        qemu_log = self._dir(name) / "qemu.log"
        log_from = qemu_log.stat().st_size if qemu_log.exists() else 0
        with self.monitor(name, timeout=300) as m:
            out = m.execute("human-monitor-command", {
                "command-line": f'qemu-io -d vd-{disk}/virtio-backend "{command}"'})
        said = qemu_error(_read_from(qemu_log, log_from), keep=5)
        if out.strip().lower().startswith("error") or said:
            reason = (out.strip().removeprefix("Error:").strip() if out.strip() else said)
            raise HypervisorError(f"qemu-io failed on {name}/{disk}: {reason}",
                                  hint=f"QEMU's messages are in {qemu_log}")
        return out

    def watch_monitor(self, name: str) -> Monitor:
        """The second, out-of-band capable monitor: the watchdog's, kept open."""
        desc = self._load(name)
        if not self._pid(desc):
            raise Conflict(f"VM {name} is not running")
        return Monitor(self._rt(desc, "qmp2"), timeout=10, connect_timeout=5, oob=True)

    def pause_mark(self, desc: dict) -> Path:
        """Present while vmreplica holds the guest paused (a cycle's settle(), continuous
        mode's hand-over): a daemon that dies meanwhile resumes it at its next start
        (resume_left_paused)."""
        return self.run_dir / f"{desc['uuid'][:8]}.paused-by-vmreplica"

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

    def mirror_start(self, name: str, disks: list[str], target: dict) -> None:
        """Start a write-blocking active mirror of ``disks`` into NBD exports (named after
        the disks) at target['host']:target['port'] over TLS. Call it with the VM paused,
        right after a cycle made the replica equal to the disks (sync: none)."""
        with self.monitor(name, timeout=30) as m:
            m.execute("object-add", {"qom-type": "tls-creds-x509", "id": "vmr-mtls",
                                     "dir": str(target["tls_dir"]), "endpoint": "client",
                                     "verify-peer": True})
            try:
                for disk in disks:
                    m.execute("blockdev-add", {
                        "driver": "nbd", "node-name": f"mt-{disk}", "export": disk,
                        "server": {"type": "inet", "host": target["host"],
                                   "port": str(target["port"])},
                        "tls-creds": "vmr-mtls", "tls-hostname": target["tls_hostname"],
                        "reconnect-delay": 0, "discard": "unmap"})   # (see base.MIRROR_DISCARDS)
                for disk in disks:
                    m.execute("blockdev-mirror", active_mirror(disk, disk, f"mt-{disk}"))
            except BaseException:
                self._mirror_teardown(m, disks)
                raise

    def mirror_status(self, name: str, mon: Monitor | None = None) -> dict[str, dict]:
        """{disk: job} for the mirror jobs that exist (status, io-status, paused, ...)."""
        if mon is not None:
            jobs = mon.execute("query-block-jobs")
        else:
            with self.monitor(name, timeout=10) as m:
                jobs = m.execute("query-block-jobs")
        return {j["device"][len("mirror-"):]: j for j in jobs
                if j.get("device", "").startswith("mirror-")}

    def mirror_yank(self, mon: Monitor, disks: list[str]) -> bool:
        """Cut the NBD connections to a replica that stopped answering, out of band:
        the guest's writes waiting on it complete, the jobs stop with an error. False:
        a yanked job cannot be resumed (a new mirror is started)."""
        mon.execute_oob("yank", {"instances": [{"type": "block-node", "node-name": f"mt-{d}"}
                                               for d in disks]})
        return False

    def mirror_resume(self, name: str, disks: list[str], target: dict | None = None) -> None:
        with self.monitor(name, timeout=10) as m:
            for disk in disks:
                try:
                    m.execute("block-job-resume", {"device": f"mirror-{disk}"})
                except HypervisorError:
                    pass

    def mirror_stop(self, name: str, disks: list[str]) -> None:
        desc = self._load(name)
        if not self._pid(desc):
            return
        with self.monitor(name, timeout=30) as m:
            with self._guest_quiet(name, desc, m):
                self._mirror_teardown(m, disks)

    @contextlib.contextmanager
    def _guest_quiet(self, name: str, desc: dict, m: Monitor):
        """The guest paused, its I/O drained, while its mirror jobs end (see
        base.QUIET_CANCEL); a pause held up by a replica that hangs is freed by yanking
        the mirror's connections through the out-of-band monitor (opened first: once
        the main loop drains, a new monitor would not get its greeting). A guest that
        cannot be paused has its jobs ended as they are."""
        jobs = [j for j in m.execute("query-block-jobs")
                if j.get("device", "").startswith("mirror-")]
        if not jobs or m.execute("query-status").get("status") != "running":
            yield
            return
        nodes = [f"mt-{j['device'][len('mirror-'):]}" for j in jobs]
        try:
            oob = self.watch_monitor(name)
        except (HypervisorError, Conflict, OSError) as e:
            log.warning("no out-of-band monitor to guard the pause of %s: %s", name, e)
            oob = None
        cut = threading.Timer(QUIET_CANCEL_GUARD, self._cut_mirror, (name, oob, nodes))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.pause_mark(desc).write_text(name)
        paused = time.monotonic()
        try:
            if oob is not None:
                cut.start()
            m.execute("stop")
            held = True
        except HypervisorError as e:
            log.warning("ending the mirror of %s without a pause: %s", name, e.message)
            self.pause_mark(desc).unlink(missing_ok=True)
            held = False
        finally:
            cut.cancel()
            if oob is not None:
                if cut.is_alive():
                    cut.join()
                oob.close()
        try:
            yield
        finally:
            if held:
                m.execute("cont")
                self.pause_mark(desc).unlink(missing_ok=True)
                log.info("%s was paused %.3f s while its mirror jobs ended", name,
                         time.monotonic() - paused)

    @staticmethod
    def _cut_mirror(name: str, oob: Monitor, nodes: list[str]) -> None:
        log.warning("pausing %s to end its mirror waited %.0f s on the replica: its "
                    "connections are yanked", name, QUIET_CANCEL_GUARD)
        try:
            oob.execute_oob("yank", {"instances": [{"type": "block-node", "node-name": n}
                                                   for n in nodes]})
        except (HypervisorError, OSError) as e:
            log.warning("yanking the mirror of %s: %s", name, e)

    def _mirror_teardown(self, m: Monitor, disks: list[str]) -> None:
        for disk in disks:
            try:
                m.execute("block-job-cancel", {"device": f"mirror-{disk}", "force": True})
            except HypervisorError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                jobs = m.execute("query-block-jobs")
            except HypervisorError:
                break
            if not any(j.get("device", "").startswith("mirror-") for j in jobs):
                break
            time.sleep(0.05)
        for disk in disks:
            try:
                m.execute("blockdev-del", {"node-name": f"mt-{disk}"})
            except HypervisorError:
                pass
        try:
            m.execute("object-del", {"id": "vmr-mtls"})
        except HypervisorError:
            pass

    # -- guest agent -----------------------------------------------------------------
    def agent_command(self, name: str, command: str, arguments: dict | None = None,
                      timeout: float = 10.0, expect_reply: bool = True):
        desc = self._load(name)
        if not desc.get("agent"):
            raise HypervisorError(f"VM {name} has no guest agent channel")
        if not self._pid(desc):
            raise Conflict(f"VM {name} is not running")
        return agent_call(self._rt(desc, "qga"), command, arguments, timeout, expect_reply)

    def freeze_filesystems(self, name: str, timeout: float = 15.0) -> None:
        """Quiesce the guest's file systems (qemu-guest-agent fsfreeze) for a consistent point."""
        self.agent_command(name, "guest-fsfreeze-freeze", timeout=timeout)

    def thaw_filesystems(self, name: str) -> None:
        self.agent_command(name, "guest-fsfreeze-thaw", timeout=10)

    # -- block access for change tracking -------------------------------------------
    # Its block sessions read a live, converging view where fleecing is refused (beside
    # continuous mode's mirror): QemuBlockSession.settle.
    live_views = True

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

    def drop_left_views(self) -> list[str]:
        """At daemon start: remove what a dead daemon's block session left in its running
        VMs' QEMU — fleecing jobs and nodes, NBD exports and the NBD server (a daemon that
        starts holds no session). Left there, every later cycle of the VM failed
        ("Duplicate nodes with node-name='fleece-disk0'", "NBD server already running").
        Active mirrors (continuous mode) are not touched."""
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

    def block_session(self, name: str) -> "QemuBlockSession":
        desc = self._load(name)
        return QemuBlockSession(self, desc)


def _drop_views(m: Monitor) -> bool:
    """Cancel fleecing jobs, delete exports, fleece nodes and the NBD server (see
    QemuDriver.drop_left_views); True if anything was there."""
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


def agent_call(path: Path, command: str, arguments: dict | None, timeout: float,
               expect_reply: bool = True):
    """One guest-agent command over its virtio-serial socket, with a sync handshake first."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise HypervisorError(f"guest agent socket {path}: {e}") from None
        f = s.makefile("rwb", buffering=0)
        sync_id = int(time.monotonic_ns() % 1_000_000_000)
        s.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                        "arguments": {"id": sync_id}}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            line = _agent_line(f, deadline)
            try:
                if json.loads(line.lstrip(b"\xff")).get("return") == sync_id:
                    break
            except ValueError:
                continue
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        s.sendall(json.dumps(msg).encode() + b"\n")
        if not expect_reply:
            return None
        reply = json.loads(_agent_line(f, deadline).lstrip(b"\xff"))
    except (socket.timeout, TimeoutError):
        raise HypervisorError(f"the guest agent did not answer {command} within {timeout:.0f} s") from None
    except OSError as e:          # the VM (and its agent channel) went away mid-call
        raise HypervisorError(f"guest agent {command}: {e}") from None
    finally:
        s.close()
    if "error" in reply:
        raise HypervisorError(f"guest agent refused {command}: {reply['error'].get('desc')}")
    return reply.get("return")


def _agent_line(f, deadline: float) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        if time.monotonic() > deadline:
            raise TimeoutError
        c = f.read(1)
        if not c:
            raise HypervisorError("the guest agent closed its channel")
        buf += c
    return buf.strip()


class QemuBlockSession:
    """Change-tracking access to a VM's disks: QMP on the VM's QEMU while it runs (fleecing
    gives the frozen view), a qemu-storage-daemon over its disks while it is off."""

    per_disk_bitmaps = True   # a bitmap can be released on some disks and kept on others

    def __init__(self, driver: QemuDriver, desc: dict):
        self.driver = driver
        self.desc = desc
        self.short = desc["uuid"][:8]
        self.sizes = {d["name"]: int(d["virtual_size"]) for d in desc["disks"]}
        self.formats = {d["name"]: d["format"] for d in desc["disks"]}
        self.paths = {d["name"]: d["path"] for d in desc["disks"]}
        self.qsd: StorageDaemon | None = None
        self._exports: list[str] = []
        self._fleece: list[str] = []
        self._nbd_started = False
        self._paused_at: float | None = None
        self.live = False                  # the view is live and converges (settle())
        self.paused_seconds = 0.0          # how long settle() paused the guest
        self.running = driver._pid(desc) is not None
        if self.running:
            self.mon = Monitor(driver._rt(desc, "qmp"), timeout=60)
            self.nbd_socket = str(driver._rt(desc, "nbd"))
        else:
            blockdevs = []
            for d in desc["disks"]:
                if d["format"] == "qcow2":
                    blockdevs += qcow2_node(d["path"], d["name"])
                else:
                    blockdevs += [{"driver": "file", "filename": d["path"],
                                   "node-name": f"{d['name']}-file"},
                                  {"driver": "raw", "file": f"{d['name']}-file",
                                   "node-name": d["name"]}]
            self.qsd = StorageDaemon(driver.run_dir, f"{self.short}-bs", blockdevs).start()
            self.mon = self.qsd.qmp
            self.nbd_socket = str(self.qsd.nbd_socket)

    # -- bitmaps -----------------------------------------------------------------------
    def bitmaps(self, disk: str) -> list[BitmapInfo]:
        nodes = self.mon.execute("query-named-block-nodes", {"flat": True})
        for n in nodes:
            if n.get("node-name") == disk:
                # A block job's own bitmap (an active mirror's) has no name: not ours.
                return [BitmapInfo(b["name"], bool(b.get("recording")), bool(b.get("persistent")),
                                   bool(b.get("inconsistent")), int(b.get("count", 0)),
                                   int(b.get("granularity", 65536)))
                        for b in n.get("dirty-bitmaps", []) if b.get("name")]
        raise HypervisorError(f"VM {self.desc['name']} has no disk node {disk}")

    def _transaction(self, actions: list[dict]) -> None:
        if actions:
            self.mon.execute("transaction", {"actions": actions})

    def freeze(self, disks: list[str], since: str | None, new: str | None) -> dict[str, Export]:
        """One transaction: start ``new``, stop ``since``, and (running VM) start fleecing."""
        actions: list[dict] = []
        for disk in disks:
            if new:
                # A raw image cannot store a bitmap: it tracks while this QEMU runs, and a
                # restart (a missing bitmap) leads to a resynchronisation.
                actions.append({"type": "block-dirty-bitmap-add",
                                "data": {"node": disk, "name": new,
                                         "persistent": self.formats[disk] == "qcow2"}})
            if since:
                actions.append({"type": "block-dirty-bitmap-disable",
                                "data": {"node": disk, "name": since}})
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
            self._transaction(actions)
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
            node = f"fleece-{disk}" if disk in self._fleece else disk
            exports[disk] = self._export(disk, node, disk, since)
        return exports

    def _export(self, disk: str, node: str, name: str, bitmap: str | None) -> Export:
        args = {"type": "nbd", "id": f"exp-{name}", "node-name": node, "name": name,
                "writable": False}
        if bitmap:
            args["bitmaps"] = [bitmap]
        self.mon.execute("block-export-add", args)
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
        self._transaction(
            [{"type": "block-dirty-bitmap-add",
              "data": {"node": d, "name": tail, "persistent": self.formats[d] == "qcow2"}}
             for d in disks] +
            [{"type": "block-dirty-bitmap-disable", "data": {"node": d, "name": new}}
             for d in disks])
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
        for export in self._exports:
            try:
                self.mon.execute("block-export-del", {"id": export})
            except HypervisorError as e:
                log.warning("removing export %s: %s", export, e)
        if self._exports:
            self._wait_exports_gone()
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

    def _wait_exports_gone(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                left = self.mon.execute("query-block-exports")
            except HypervisorError:
                return
            if not any(e.get("id", "").startswith("exp-") for e in left):
                return
            time.sleep(0.01)

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

    def add_bitmap(self, disks: list[str], name: str) -> None:
        """Start recording into a new bitmap (continuous mode rotates them). Idempotent: a
        disk that has it already (an earlier rotation stopped half-way) keeps it."""
        self._transaction([{"type": "block-dirty-bitmap-add",
                            "data": {"node": d, "name": name,
                                     "persistent": self.formats[d] == "qcow2"}}
                           for d in disks if name not in {b.name for b in self.bitmaps(d)}])

    def release(self, disks: list[str], names: list[str]) -> None:
        """Remove bitmaps ``names`` from ``disks`` (those that exist)."""
        actions = []
        for disk in disks:
            have = {b.name for b in self.bitmaps(disk)}
            actions += [{"type": "block-dirty-bitmap-remove", "data": {"node": disk, "name": n}}
                        for n in names if n in have]
        self._transaction(actions)

    def restore(self, disks: list[str], since: str, new: str) -> None:
        """Undo a freeze: ``since`` records again and takes back what ``new`` recorded."""
        actions = []
        for disk in disks:
            have = {b.name for b in self.bitmaps(disk)}
            if since in have:
                actions.append({"type": "block-dirty-bitmap-enable",
                                "data": {"node": disk, "name": since}})
                if new in have:
                    actions.append({"type": "block-dirty-bitmap-merge",
                                    "data": {"node": disk, "target": since, "bitmaps": [new]}})
            if new in have:
                actions.append({"type": "block-dirty-bitmap-remove",
                                "data": {"node": disk, "name": new}})
        self._transaction(actions)

    def merge(self, disks: list[str], target: str, sources: list[str]) -> None:
        """Fold ``sources`` into ``target`` (enabled) and remove them: a superset, never less."""
        actions = []
        for disk in disks:
            have = {b.name: b for b in self.bitmaps(disk)}
            srcs = [s for s in sources if s in have and s != target]
            if target in have and not have[target].recording:
                actions.append({"type": "block-dirty-bitmap-enable",
                                "data": {"node": disk, "name": target}})
            if srcs:
                actions.append({"type": "block-dirty-bitmap-merge",
                                "data": {"node": disk, "target": target, "bitmaps": srcs}})
                actions += [{"type": "block-dirty-bitmap-remove", "data": {"node": disk, "name": s}}
                            for s in srcs]
        self._transaction(actions)

    def close(self) -> None:
        try:
            self.unexport()
        finally:
            if self.qsd is not None:
                self.qsd.close()
            else:
                self.mon.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# -- accelerator -------------------------------------------------------------------------

def resolve_accel(setting: str, home: Path) -> str:
    """``auto`` probes whether KVM boots a guest once per machine (hypervisor.kvmprobe)."""
    from . import kvmprobe
    return kvmprobe.resolve(setting, Path(home) / "run")


def probe_kvm(work: Path, timeout: float = 20.0) -> tuple[str, str]:
    from . import kvmprobe
    return kvmprobe.probe_kvm(work, timeout)


def _process_age(pid: int) -> float | None:
    """Seconds since process `pid` started (/proc), None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
