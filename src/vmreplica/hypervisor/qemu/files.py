"""The qemu driver's ground floor: a VM's files (its description vm.json, the runtime
files of its QEMU), whether its QEMU runs (the pid file, checked against the VM's uuid),
its main monitor, the pause mark. Every part of the driver (inventory, agent, block,
mirror, collapse) is a subclass of ``QemuFiles``; ``driver.QemuDriver`` combines them.

    HOME/vms/NAME/vm.json         the VM's description (name, uuid, memory, disks, guest)
    HOME/run/<uuid8>.{qmp,qmp2,qmpc,qga,pid,nbd}   runtime files of its QEMU
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...errors import Conflict, NotFound
from ...qemutools.atrest import AtRestDaemon
from ...qemutools.qmp import Monitor
from ..base import DiskInfo, VMInfo
from .cmdline import ISOLATED_MAC


class QemuFiles:
    def __init__(self, home: Path, config: dict):
        self.home = Path(home)
        self.vms_dir = self.home / "vms"
        self.run_dir = self.home / "run"
        self.accel_setting = config.get("accel") or "auto"
        # the storage daemon the block sessions of powered-off VMs share (session.py)
        self.at_rest = AtRestDaemon(self.run_dir)

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
                   for d in desc["disks"]],
            # its one NIC, on the isolated network (a test VM), has QEMU's default MAC
            nics=[ISOLATED_MAC] if desc.get("network") == "isolated" else [])

    def monitor(self, name: str, timeout: float = 30.0) -> Monitor:
        desc = self._load(name)
        if not self._pid(desc):
            raise Conflict(f"VM {name} is not running")
        return Monitor(self._rt(desc, "qmp"), timeout=timeout)

    def pause_mark(self, desc: dict) -> Path:
        """Present while vmreplica holds the guest paused (a cycle's settle(), continuous
        mode's hand-over): a daemon that dies meanwhile resumes it at its next start
        (resume_left_paused)."""
        return self.run_dir / f"{desc['uuid'][:8]}.paused-by-vmreplica"
