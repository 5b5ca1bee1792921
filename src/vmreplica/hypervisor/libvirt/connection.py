"""The libvirt driver's ground floor: the connection to libvirtd, this host's name and
its domains' names, looking a VM's domain up (``LibvirtBase._load``) and writing its
persistent definition back (never an existing domain's), the pause mark; and the plumbing every part uses: libvirt's
error text, QMP passed through libvirt to the domain's QEMU, the uid:gid QEMU runs as.

Every part of the driver (inventory, agent, block, mirror, collapse) is a subclass of
``LibvirtBase``; ``driver.LibvirtDriver`` combines them.

The host name comes from ``config["host_name"]``, else from the home's state.db (setting
``name``). Taints: bitmap queries and merges use ``qemuMonitorCommand`` and guest-agent
calls use ``qemuAgentCommand``; libvirt marks such domains
``custom-monitor``/``custom-ga-command`` in their log (harmless).
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import sqlite3
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TypeGuard

import libvirt
import libvirt_qemu

from ...errors import Conflict, HypervisorError, NotFound, UsageError
from ...qemutools import qmp
from ..base import DiskInfo, VMInfo, block_device_size
from .domainxml import VMDef, domain_xml, existing_disks, existing_vm, meta_element, parse, vmr

QEMU_USER = "libvirt-qemu"
PID_DIR = Path("/run/libvirt/qemu")


def _silence(_ctx, _err):
    """libvirt prints every error on stderr unless a handler is registered; we raise them."""


libvirt.registerErrorHandler(_silence, None)


def lv_error(e: libvirt.libvirtError) -> str:
    msg = e.get_error_message() or str(e)
    return msg.strip()


def is_active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def passthrough(dom: libvirt.virDomain, command: str, arguments: dict | None = None):
    """One QMP command to the domain's QEMU through libvirt (qemuMonitorCommand)."""
    msg: dict = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    try:
        raw = libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0)
    except libvirt.libvirtError as e:
        raise HypervisorError(f"libvirt could not pass {command} to QEMU: {lv_error(e)}") from None
    return qmp.result(command, json.loads(raw))


class Passthrough:
    """A domain's QEMU as a target of qemutools.qmpsteps (``execute`` = passthrough)."""

    def __init__(self, dom: libvirt.virDomain):
        self.dom = dom

    def execute(self, command: str, arguments: dict | None = None):
        return passthrough(self.dom, command, arguments)


def qemu_ids(live_xml: str | None = None) -> tuple[int, int] | None:
    """uid:gid QEMU runs as: the live DAC label of a running domain, else libvirt-qemu."""
    if live_xml:
        m = re.search(r"<seclabel[^>]*model='dac'[^>]*>\s*<label>\+?(\d+):\+?(\d+)</label>",
                      live_xml)
        if m:
            return int(m.group(1)), int(m.group(2))
    try:
        pw = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return None
    try:
        gid = grp.getgrnam(QEMU_USER).gr_gid
    except KeyError:
        gid = pw.pw_gid
    return pw.pw_uid, gid


class LibvirtBase:
    """The connection, this host's naming and the lookups and definition writes every
    part of the driver uses."""

    _active = staticmethod(is_active)

    def __init__(self, home: Path, config: dict):
        self.home = Path(home).absolute()
        self.vms_dir = self.home / "vms"
        self.run_dir = self.home / "run"
        self.uri = config.get("libvirt_uri") or "qemu:///system"
        self.accel_setting = config.get("accel") or "auto"
        self._host_name = config.get("host_name")
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()

    # -- connection and identity -----------------------------------------------------
    @property
    def host_name(self) -> str:
        if not self._host_name:
            self._host_name = self._read_host_name()
        return self._host_name

    def _read_host_name(self) -> str:
        db = self.home / "state.db"
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            try:
                row = con.execute("SELECT value FROM settings WHERE key='name'").fetchone()
            finally:
                con.close()
        except sqlite3.Error as e:
            raise UsageError(f"cannot read this host's name from {db}: {e}",
                             hint="the libvirt driver needs an initialised host home "
                                  "(or config host_name)") from None
        if not row:
            raise UsageError(f"{db} has no host name setting")
        return str(json.loads(row[0]))

    @property
    def conn(self) -> libvirt.virConnect:
        with self._conn_lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise HypervisorError(f"cannot connect to libvirt at {self.uri}: {lv_error(e)}",
                                      hint="is libvirtd running? scripts/start-libvirtd.sh "
                                           "starts it") from None
            return self._conn

    def domain_name(self, name: str) -> str:
        return f"vmr-{self.host_name}-{name}"

    def domain_type(self) -> str:
        # A Linux guest hangs under nested KVM on these machines: only an explicit
        # `kvm` setting asks for it; `auto` and `tcg` use TCG (libvirt type 'qemu').
        return "kvm" if self.accel_setting == "kvm" else "qemu"

    # -- lookups -----------------------------------------------------------------------
    def _not_found(self, name: str) -> NotFound:
        return NotFound(f"no VM named {name} on this host",
                        hint="`vmreplica vm list` shows the VMs of this host")

    def _ours(self, vm: VMDef | None) -> TypeGuard[VMDef]:
        return vm is not None and Path(vm.home) == self.home

    def _domain(self, name: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(self.domain_name(name))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise self._not_found(name) from None
            raise HypervisorError(f"libvirt: {lv_error(e)}") from None

    def _xml(self, dom: libvirt.virDomain) -> str:
        try:
            return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: {lv_error(e)}") from None

    def _load(self, name: str) -> tuple[libvirt.virDomain, ET.Element, VMDef]:
        """The VM ``name``: this host's vmreplica VM of that name (domain
        vmr-HOST-NAME), else an existing domain of that libvirt name without vmreplica
        metadata (a vmreplica VM shadows an existing domain of the same name)."""
        try:
            dom = self._domain(name)
        except NotFound:
            return self._load_existing(name)
        root, vm = parse(self._xml(dom))
        if not self._ours(vm) or vm.name != name:
            raise self._not_found(name)
        return dom, root, vm

    def _load_existing(self, name: str) -> tuple[libvirt.virDomain, ET.Element, VMDef]:
        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise self._not_found(name) from None
            raise HypervisorError(f"libvirt: {lv_error(e)}") from None
        root, vm = parse(self._xml(dom))
        if vm is not None:          # a vmreplica VM (of this or another host's home)
            raise self._not_found(name)
        return dom, root, self._existing(dom, root)

    def _existing(self, dom: libvirt.virDomain, root: ET.Element) -> VMDef:
        """An existing domain as a VM of this host; its disks' virtual sizes from libvirt
        (virDomainGetBlockInfo answers for a shut-off domain too)."""
        sizes = {}
        for d in existing_disks(root):
            try:
                sizes[d.target] = int(dom.blockInfo(d.target, 0)[0])
            except libvirt.libvirtError:
                # (a missing image: the size is unknown; a block device: its own size)
                sizes[d.target] = block_device_size(d.path) if d.kind == "block" else 0
        return existing_vm(root, self.host_name, str(self.home), sizes)

    def _dir(self, name: str) -> Path:
        return self.vms_dir / name

    def _pid(self, dom: libvirt.virDomain) -> int | None:
        if not self._active(dom):
            return None
        try:
            pid = int((PID_DIR / f"{dom.name()}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def _info(self, dom: libvirt.virDomain, vm: VMDef) -> VMInfo:
        pid = self._pid(dom)
        running = self._active(dom)
        return VMInfo(name=vm.name, uuid=vm.uuid, state="running" if running else "stopped",
                      memory_mb=vm.memory_mb, guest=vm.guest, pid=pid, agent=vm.agent,
                      disks=[DiskInfo(d.name, d.path, d.format, d.virtual_size, d.kind)
                             for d in vm.disks],
                      origin="existing" if vm.existing else "vmreplica", nics=vm.nics)

    # -- the persistent definition -----------------------------------------------------
    def _mkdir_vm(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)   # QEMU (libvirt-qemu) opens disks and the console below it

    def _refuse_existing(self, vm: VMDef, what: str) -> None:
        if vm.existing:
            raise Conflict(f"{vm.name} is an existing libvirt domain (vmreplica did not "
                           f"create it): vmreplica does not {what}",
                           hint="change it with libvirt's own tools (virsh edit)")

    def _define(self, vm: VMDef) -> libvirt.virDomain:
        self._refuse_existing(vm, "rewrite its definition")
        if vm.carried:      # (its XML is the primary's, edited in place: _redefine)
            raise HypervisorError(f"{vm.name} is defined from its primary's domain: its "
                                  "XML is never regenerated")
        root = domain_xml(vm, self.domain_type(), self._dir(vm.name) / "console.log")
        dom = self._define_xml(ET.tostring(root, encoding="unicode"), vm.name)
        self._describe_to_folder(vm)
        return dom

    def _describe_to_folder(self, vm: VMDef) -> None:
        """HOME/vms/NAME/vm.json, as the qemu driver keeps it: a copy of the VM's folder
        (a backup restored elsewhere) carries the VM's identity and its disks' names, which
        `initial --method existing` checks before it adopts a copy."""
        d = self._dir(vm.name)
        if not d.exists():
            return
        desc = {"name": vm.name, "uuid": vm.uuid, "memory_mb": vm.memory_mb, "guest": vm.guest,
                "agent": vm.agent, "network": vm.network or "none", "driver": "libvirt",
                "disks": [{"name": x.name, "path": x.path, "format": x.format,
                           "virtual_size": x.virtual_size} for x in vm.disks]}
        tmp = d / "vm.json.tmp"
        tmp.write_text(json.dumps(desc, indent=2, sort_keys=True))
        os.replace(tmp, d / "vm.json")

    def _define_xml(self, xml: str, name: str) -> libvirt.virDomain:
        try:
            dom = self.conn.defineXML(xml)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt could not define {name}: {lv_error(e)}") from None
        try:
            if dom.autostart():
                dom.setAutostart(0)
        except libvirt.libvirtError:
            pass
        return dom

    def _redefine(self, root: ET.Element, vm: VMDef) -> None:
        """Write back the persistent definition with ``vm``'s metadata (never an
        existing domain's)."""
        self._refuse_existing(vm, "rewrite its definition")
        meta = root.find("metadata")
        if meta is None:
            meta = ET.Element("metadata")
            root.insert(3, meta)
        for old in meta.findall(vmr("vm")):
            meta.remove(old)
        meta.append(meta_element(vm))
        self._define_xml(ET.tostring(root, encoding="unicode"), vm.name)
        self._describe_to_folder(vm)

    # -- run state ---------------------------------------------------------------------
    def _pause_mark(self, name: str) -> Path:
        """Present while vmreplica holds the domain paused (continuous mode's hand-over):
        a daemon that dies meanwhile resumes it at its next start (resume_left_paused)."""
        return self.run_dir / f"lv-{hashlib.sha1(name.encode()).hexdigest()[:8]}.paused-by-vmreplica"

    def _run_state(self, name: str, verb: str, fn) -> None:
        dom, _, _ = self._load(name)
        try:
            fn(dom)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt could not {verb} {name}: {lv_error(e)}") from None
