"""The `libvirt` driver: VMs are libvirt domains (libvirt-python), for hosts that run libvirtd.

Same protocol and semantics as the embedded `qemu` driver; change tracking goes through
libvirt checkpoints and pull-mode backups while a domain runs, and through a
qemu-storage-daemon on the same persistent bitmaps while it is shut off.

Naming (several vmreplica hosts may share one libvirtd, and a replica VM has the same
vmreplica name and identity uuid as its primary):

    domain name    vmr-<host name>-<vm name>            e.g. vmr-site-a-web1
    domain uuid    uuid5(NAMESPACE_URL, "<host name>/<identity uuid>")
    <metadata>     <vmr:vm xmlns:vmr="https://vmreplica.example/ns/1"> with the vmreplica
                   name, the identity uuid (the one describe()/define_vm use), the host
                   name and home, guest, agent, network, disks (name, target, format,
                   virtual size) and ``owns`` (paths deleted with the VM)
    <title>        "web1 (vmreplica VM of site-a)"; callers relabel replicas with
                   ``set_title`` ("replica of web1 on site-a")
    disks          disk0, disk1, ... in the order of the description → vda, vdb, ...
                   (virtio-blk, <serial>diskN</serial>); the demo guest writes to the last
    checkpoints    the tracker's bitmap names; libvirt names each qcow2 bitmap after its
                   checkpoint
    NBD exports    named after the disk target (vda); dirty context qemu:dirty-bitmap:backup-vda

The host name comes from ``config["host_name"]``, else from the home's state.db (setting
``name``). ``list_vms`` shows only domains whose metadata names this host's home. Domains
are never autostarted.

Files:

    HOME/vms/NAME/                 the VM folder (mode 0755)
    HOME/vms/NAME/diskN.FMT        disks made by `vm create` (deleted with the VM)
    HOME/vms/NAME/console.log      the serial console (written by libvirt, root 0600)
    HOME/vms/NAME/scratch-vdX.qcow2  pull-backup scratch images (libvirt creates, labels
                                   and deletes them)
    HOME/vms/NAME/run/nbd.sock     the pull-backup NBD socket; QEMU creates it, so this
                                   folder is chowned to the uid:gid QEMU runs as
    HOME/run/lv-<uuid8>-bs.*       the storage daemon of a shut-off VM's block session

Permissions: QEMU runs as ``libvirt-qemu``. Every directory above a disk image must be
traversable by it (a host home under /tmp with mode 0755 works; ``mktemp -d`` folders,
mode 0700, do not): ``start`` checks and says which directory is not. libvirt's
``dynamic_ownership`` (Debian's default, /etc/libvirt/qemu.conf is never edited) chowns
images and scratch files to libvirt-qemu while the domain runs and gives them back to
root when it stops, so files our daemon creates as root (overlays, replica heads) need
nothing more. AppArmor is not active on these machines; with it, libvirt's
virt-aa-helper labels the same files.

Change tracking, as verified on libvirt 9.0 + QEMU 7.2:

- Every checkpoint's bitmap records from its creation onwards (they all stay enabled);
  an incremental backup from checkpoint C exports a frozen copy of C's bitmap
  (``backup-vdX``) while C goes on recording. Deleting a checkpoint just removes its
  bitmap (no merging into a parent).
- ``freeze(since, new)`` while running is one ``virDomainBackupBegin`` (pull mode,
  ``<incremental>since``) with a checkpoint XML creating ``new``: the frozen view and the
  new checkpoint are atomic. ``restore(since, new)`` deletes checkpoint ``new``: ``since``
  kept recording through the failed cycle, so the next cycle from ``since`` sees
  everything. ``merge(target, sources)`` ORs the sources' bits into ``target`` (a no-op
  for newer sources, which ``target`` covers) and deletes them.
- libvirt 9.0 cannot create or delete checkpoints of a shut-off domain (it says
  "cannot create/delete checkpoint for inactive domain"). While off, the session opens
  the images in a qemu-storage-daemon, adds/removes the persistent bitmaps there and
  keeps libvirt's metadata in step with ``checkpointCreateXML(REDEFINE)`` and
  ``delete(METADATA_ONLY)``; once the domain runs again libvirt uses those checkpoints
  like its own. QEMU refuses a read-only NBD export of an enabled bitmap, so the
  off-line view exports a disabled copy named like libvirt's (``backup-vdX``).
- A raw disk cannot hold a persistent bitmap: it gets ``checkpoint='no'``; a freeze with
  ``since`` over a raw disk raises ``TrackingError`` (the caller resynchronises).

Taints: bitmap queries and merges use ``qemuMonitorCommand`` and guest-agent calls use
``qemuAgentCommand``; libvirt marks such domains ``custom-monitor``/``custom-ga-command``
in their log (harmless).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import sqlite3
import stat
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import libvirt_qemu

from ..errors import Conflict, HypervisorError, NotFound, TrackingError, UsageError
from ..qemutools import img
from ..qemutools.qmp import QMPError
from ..qemutools.qsd import StorageDaemon, qcow2_node
from .base import QUIET_CANCEL_GUARD, BitmapInfo, DiskInfo, Export, VMInfo, active_mirror
from .guest import guest_files

log = logging.getLogger("vmreplica.libvirt")

NS = "https://vmreplica.example/ns/1"
ET.register_namespace("vmr", NS)
ISOLATED_NETWORK = "vmreplica-isolated"
ISOLATED_BRIDGE = "vmr-isolated"
AGENT_PORT = "org.qemu.guest_agent.0"
QEMU_USER = "libvirt-qemu"
PID_DIR = Path("/run/libvirt/qemu")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                  | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                  | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
MAX_SOCKET_PATH = 107


def _silence(_ctx, _err):
    """libvirt prints every error on stderr unless a handler is registered; we raise them."""


libvirt.registerErrorHandler(_silence, None)


def _q(tag: str) -> str:
    return f"{{{NS}}}{tag}"


def target_of(index: int) -> str:
    """0 → vda, 25 → vdz, 26 → vdaa (libvirt's disk name ↔ index rule)."""
    letters = ""
    i = index + 1
    while i > 0:
        i, r = divmod(i - 1, 26)
        letters = chr(ord("a") + r) + letters
    return "vd" + letters


def domain_uuid(host_name: str, identity: str) -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{host_name}/{identity}"))


def _lv_error(e: libvirt.libvirtError) -> str:
    msg = e.get_error_message() or str(e)
    return msg.strip()


@dataclass
class _Disk:
    name: str
    target: str
    path: str
    format: str
    virtual_size: int
    created: bool = False


@dataclass
class _VM:
    """A vmreplica VM as read from its domain's persistent XML."""
    dom_name: str
    name: str
    uuid: str
    host: str
    home: str
    memory_mb: int
    guest: str | None
    agent: bool
    network: str
    created_at: float
    disks: list[_Disk] = field(default_factory=list)
    owns: list[str] = field(default_factory=list)
    title: str = ""
    description: str = ""

    def disk(self, name: str) -> _Disk:
        for d in self.disks:
            if d.name == name:
                return d
        raise HypervisorError(f"VM {self.name} has no disk {name}")


def _parse(xml: str) -> tuple[ET.Element, _VM | None]:
    root = ET.fromstring(xml)
    meta = root.find(f"metadata/{_q('vm')}")
    if meta is None:
        return root, None

    def text(tag: str, default: str = "") -> str:
        el = meta.find(_q(tag))
        return (el.text or "").strip() if el is not None and el.text else default

    sources = {}
    for d in root.findall("devices/disk"):
        t = d.find("target")
        s = d.find("source")
        if t is not None:
            sources[t.get("dev")] = s.get("file") if s is not None else ""
    disks = []
    for d in meta.findall(f"{_q('disks')}/{_q('disk')}"):
        disks.append(_Disk(d.get("name"), d.get("target"), sources.get(d.get("target"), ""),
                           d.get("format", "qcow2"), int(d.get("virtual-size", "0")),
                           d.get("created") == "yes"))
    mem = root.find("memory")
    kib = int(mem.text) * {"KiB": 1, "MiB": 1024, "GiB": 1 << 20, "k": 1, "M": 1024,
                           "G": 1 << 20}.get(mem.get("unit", "KiB"), 1)
    title = root.find("title")
    desc = root.find("description")
    try:
        created = float(text("created-at", "0") or 0)
    except ValueError:
        created = 0.0
    vm = _VM(dom_name=root.findtext("name"), name=text("name"), uuid=text("uuid"),
             host=text("host"), home=text("home"), memory_mb=kib // 1024,
             guest=text("guest") or None, agent=text("agent") == "yes",
             network=text("network", "none") or "none", created_at=created, disks=disks,
             owns=[(p.text or "") for p in meta.findall(f"{_q('owns')}/{_q('path')}")],
             title=title.text if title is not None and title.text else "",
             description=desc.text if desc is not None and desc.text else "")
    return root, vm


def _meta_element(vm: _VM) -> ET.Element:
    m = ET.Element(_q("vm"), {"version": "1"})
    for tag, value in (("name", vm.name), ("uuid", vm.uuid), ("host", vm.host),
                       ("home", vm.home), ("guest", vm.guest or ""),
                       ("agent", "yes" if vm.agent else "no"), ("network", vm.network),
                       ("created-at", repr(vm.created_at))):
        ET.SubElement(m, _q(tag)).text = value
    disks = ET.SubElement(m, _q("disks"))
    for d in vm.disks:
        ET.SubElement(disks, _q("disk"), {"name": d.name, "target": d.target,
                                          "format": d.format,
                                          "virtual-size": str(d.virtual_size),
                                          "created": "yes" if d.created else "no"})
    owns = ET.SubElement(m, _q("owns"))
    for p in vm.owns:
        ET.SubElement(owns, _q("path")).text = p
    return m


def _set_child_text(parent: ET.Element, tag: str, text: str, index: int) -> None:
    el = parent.find(tag)
    if el is None:
        el = ET.Element(tag)
        parent.insert(index, el)
    el.text = text


class LibvirtDriver:
    name = "libvirt"

    def __init__(self, home: Path, config: dict):
        self.home = Path(home).absolute()
        self.vms_dir = self.home / "vms"
        self.run_dir = self.home / "run"
        self.uri = config.get("libvirt_uri") or "qemu:///system"
        self.accel_setting = config.get("accel") or "auto"
        self._host_name = config.get("host_name")
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()
        self._lock = threading.Lock()
        self._relays: dict[str, StorageDaemon] = {}    # continuous mode: vm → its relay
        self._targets: dict[str, tuple[list[str], dict]] = {}   # vm → (disks, target)

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
                raise HypervisorError(f"cannot connect to libvirt at {self.uri}: {_lv_error(e)}",
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

    def _ours(self, vm: _VM | None) -> bool:
        return vm is not None and Path(vm.home) == self.home

    def _domain(self, name: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(self.domain_name(name))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise self._not_found(name) from None
            raise HypervisorError(f"libvirt: {_lv_error(e)}") from None

    def _xml(self, dom: libvirt.virDomain) -> str:
        try:
            return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: {_lv_error(e)}") from None

    def _load(self, name: str) -> tuple[libvirt.virDomain, ET.Element, _VM]:
        dom = self._domain(name)
        root, vm = _parse(self._xml(dom))
        if not self._ours(vm) or vm.name != name:
            raise self._not_found(name)
        return dom, root, vm

    def _dir(self, name: str) -> Path:
        return self.vms_dir / name

    @staticmethod
    def _active(dom: libvirt.virDomain) -> bool:
        try:
            return bool(dom.isActive())
        except libvirt.libvirtError:
            return False

    def _pid(self, dom: libvirt.virDomain) -> int | None:
        if not self._active(dom):
            return None
        try:
            pid = int((PID_DIR / f"{dom.name()}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def _info(self, dom: libvirt.virDomain, vm: _VM) -> VMInfo:
        pid = self._pid(dom)
        running = self._active(dom)
        return VMInfo(name=vm.name, uuid=vm.uuid, state="running" if running else "stopped",
                      memory_mb=vm.memory_mb, guest=vm.guest, pid=pid, agent=vm.agent,
                      disks=[DiskInfo(d.name, d.path, d.format, d.virtual_size)
                             for d in vm.disks])

    # -- inventory ---------------------------------------------------------------------
    def list_vms(self) -> list[VMInfo]:
        out = []
        prefix = f"vmr-{self.host_name}-"
        try:
            doms = self.conn.listAllDomains(0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: {_lv_error(e)}") from None
        for dom in doms:
            try:
                if not dom.name().startswith(prefix):
                    continue
                _, vm = _parse(self._xml(dom))
            except (HypervisorError, libvirt.libvirtError, ET.ParseError):
                continue  # undefined meanwhile, or not ours
            if self._ours(vm) and dom.name() == self.domain_name(vm.name):
                out.append(self._info(dom, vm))
        return sorted(out, key=lambda i: i.name)

    def inspect(self, name: str) -> VMInfo:
        dom, _, vm = self._load(name)
        return self._info(dom, vm)

    def describe(self, name: str) -> dict:
        """Portable description: what another host needs to define the same VM."""
        _, _, vm = self._load(name)
        return {"name": vm.name, "uuid": vm.uuid, "memory_mb": vm.memory_mb,
                "guest": vm.guest, "agent": vm.agent, "network": vm.network or "none",
                "disks": [{"name": d.name, "format": d.format, "virtual_size": d.virtual_size}
                          for d in vm.disks]}

    def exists(self, name: str) -> bool:
        try:
            self._load(name)
            return True
        except NotFound:
            return False

    def domain_of(self, name: str) -> str:
        """The libvirt domain name of a VM (for operators and tests)."""
        dom, _, _ = self._load(name)
        return dom.name()

    # -- create / define / delete ----------------------------------------------------
    def _check_free(self, name: str, identity: str) -> None:
        dom_name = self.domain_name(name)
        try:
            dom = self.conn.lookupByName(dom_name)
        except libvirt.libvirtError:
            dom = None
        if dom is not None:
            _, vm = _parse(self._xml(dom))
            if self._ours(vm):
                raise Conflict(f"a VM named {name} already exists on this host")
            other = vm.home if vm else "no vmreplica metadata"
            raise Conflict(f"libvirt already has a domain named {dom_name} ({other})",
                           hint=f"another host home uses the host name {self.host_name}; "
                                f"remove that domain (`virsh undefine {dom_name}`) or rename "
                                "this host")
        try:
            dom = self.conn.lookupByUUIDString(domain_uuid(self.host_name, identity))
        except libvirt.libvirtError:
            dom = None
        if dom is not None:
            raise Conflict(f"libvirt domain {dom.name()} already has the identity {identity} "
                           f"on host {self.host_name}",
                           hint="a VM's identity uuid must be unique on one host")

    def create_vm(self, name: str, sizes: list[int], memory_mb: int = 256,
                  guest: str | None = None, disk_format: str = "qcow2") -> VMInfo:
        if disk_format not in ("qcow2", "raw"):
            raise UsageError(f"unsupported disk format {disk_format!r}", hint="use qcow2 or raw")
        if guest is not None:
            guest_files(guest)  # fails clearly if the demo guest was not built
        identity = str(uuidlib.uuid4())
        self._check_free(name, identity)
        d = self._dir(name)
        if d.exists():
            raise Conflict(f"a VM folder {d} already exists on this host",
                           hint="delete the leftover folder, or choose another name")
        self._mkdir_vm(d)
        try:
            disks = []
            for i, size in enumerate(sizes):
                path = d / f"disk{i}.{disk_format}"
                img.create(path, size, disk_format)
                disks.append(_Disk(f"disk{i}", target_of(i), str(path), disk_format, int(size),
                                   created=True))
            vm = _VM(dom_name=self.domain_name(name), name=name, uuid=identity,
                     host=self.host_name, home=str(self.home), memory_mb=int(memory_mb),
                     guest=guest, agent=guest is not None, network="none",
                     created_at=time.time(), disks=disks)
            dom = self._define(vm)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        return self._info(dom, vm)

    def define_vm(self, desc: dict) -> VMInfo:
        """Define a VM whose disks already exist (a replica, a failed-over VM)."""
        name = desc["name"]
        for d in desc["disks"]:
            if not d.get("path"):
                raise UsageError(f"disk {d['name']} of {name} has no path")
        network = desc.get("network") or "none"
        if network not in ("none", "isolated"):
            raise UsageError(f"unsupported network {network!r}", hint="use none or isolated")
        identity = desc.get("uuid") or str(uuidlib.uuid4())
        self._check_free(name, identity)
        vmdir = self._dir(name)
        if vmdir.exists() and any(vmdir.iterdir()):
            raise Conflict(f"a VM folder {vmdir} already exists on this host",
                           hint="delete the leftover folder, or choose another name")
        self._mkdir_vm(vmdir)
        vm = _VM(dom_name=self.domain_name(name), name=name, uuid=identity, host=self.host_name,
                 home=str(self.home), memory_mb=int(desc.get("memory_mb") or 256),
                 guest=desc.get("guest"), agent=bool(desc.get("agent")), network=network,
                 created_at=time.time(),
                 # Files and folders outside the VM folder that belong to this VM and go
                 # with it when it is deleted (a replica's storage, say).
                 owns=[str(p) for p in desc.get("owns") or []],
                 disks=[_Disk(d["name"], target_of(i), str(d["path"]), d.get("format", "qcow2"),
                              int(d["virtual_size"]))
                        for i, d in enumerate(desc["disks"])],
                 title=desc.get("title") or "", description=desc.get("description") or "")
        try:
            dom = self._define(vm)
        except BaseException:
            shutil.rmtree(vmdir, ignore_errors=True)
            raise
        return self._info(dom, vm)

    def _mkdir_vm(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)   # QEMU (libvirt-qemu) opens disks and the console below it

    def _domain_xml(self, vm: _VM) -> ET.Element:
        root = ET.Element("domain", {"type": self.domain_type()})
        ET.SubElement(root, "name").text = vm.dom_name
        ET.SubElement(root, "uuid").text = domain_uuid(vm.host, vm.uuid)
        ET.SubElement(root, "title").text = vm.title or f"{vm.name} (vmreplica VM of {vm.host})"
        ET.SubElement(root, "description").text = vm.description or (
            f"vmreplica VM {vm.name} (identity {vm.uuid}) of host {vm.host}, home {vm.home}. "
            "Managed by vmreplica: change it with vmreplica, not virsh.")
        meta = ET.SubElement(root, "metadata")
        meta.append(_meta_element(vm))
        ET.SubElement(root, "memory", {"unit": "MiB"}).text = str(vm.memory_mb)
        ET.SubElement(root, "vcpu").text = "1"
        os_el = ET.SubElement(root, "os")
        ET.SubElement(os_el, "type", {"arch": "x86_64", "machine": "pc"}).text = "hvm"
        if vm.guest:
            files = guest_files(vm.guest)
            ET.SubElement(os_el, "kernel").text = str(files["kernel"])
            ET.SubElement(os_el, "initrd").text = str(files["initrd"])
            ET.SubElement(os_el, "cmdline").text = files["cmdline"]
        features = ET.SubElement(root, "features")
        ET.SubElement(features, "acpi")
        if self.domain_type() == "kvm":
            ET.SubElement(root, "cpu", {"mode": "host-passthrough"})
        ET.SubElement(root, "on_poweroff").text = "destroy"
        # The demo guest reboots only to die (panic=-1): like -no-reboot on the qemu driver.
        ET.SubElement(root, "on_reboot").text = "destroy" if vm.guest else "restart"
        ET.SubElement(root, "on_crash").text = "destroy"
        devices = ET.SubElement(root, "devices")
        for d in vm.disks:
            disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
            ET.SubElement(disk, "driver", {"name": "qemu", "type": d.format, "discard": "unmap"})
            ET.SubElement(disk, "source", {"file": d.path})
            ET.SubElement(disk, "target", {"dev": d.target, "bus": "virtio"})
            ET.SubElement(disk, "serial").text = d.name
        serial = ET.SubElement(devices, "serial", {"type": "file"})
        ET.SubElement(serial, "source", {"path": str(self._dir(vm.name) / "console.log")})
        ET.SubElement(serial, "target", {"port": "0"})
        if vm.agent:
            ch = ET.SubElement(devices, "channel", {"type": "unix"})
            ET.SubElement(ch, "target", {"type": "virtio", "name": AGENT_PORT})
        if vm.network == "isolated":
            nic = ET.SubElement(devices, "interface", {"type": "network"})
            ET.SubElement(nic, "source", {"network": ISOLATED_NETWORK})
            ET.SubElement(nic, "model", {"type": "virtio"})
        ET.SubElement(devices, "memballoon", {"model": "none"})
        return root

    def _define(self, vm: _VM) -> libvirt.virDomain:
        dom = self._define_xml(ET.tostring(self._domain_xml(vm), encoding="unicode"), vm.name)
        self._describe_to_folder(vm)
        return dom

    def _describe_to_folder(self, vm: _VM) -> None:
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
            raise HypervisorError(f"libvirt could not define {name}: {_lv_error(e)}") from None
        try:
            if dom.autostart():
                dom.setAutostart(0)
        except libvirt.libvirtError:
            pass
        return dom

    def _redefine(self, root: ET.Element, vm: _VM) -> None:
        """Write back the persistent definition with ``vm``'s metadata."""
        meta = root.find("metadata")
        if meta is None:
            meta = ET.Element("metadata")
            root.insert(3, meta)
        for old in meta.findall(_q("vm")):
            meta.remove(old)
        meta.append(_meta_element(vm))
        self._define_xml(ET.tostring(root, encoding="unicode"), vm.name)
        self._describe_to_folder(vm)

    def replace_disks(self, name: str, disks: list[dict]) -> None:
        """Give a stopped VM another list of disks ({name, path, format, virtual_size}),
        in guest order (a replica whose set of replicated disks changed)."""
        dom, _, vm = self._load(name)
        if self._active(dom):
            raise Conflict(f"VM {name} is running")
        vm.disks = [_Disk(d["name"], target_of(i), str(d["path"]), d.get("format", "qcow2"),
                          int(d["virtual_size"])) for i, d in enumerate(disks)]
        self._define(vm)

    def set_disks(self, name: str, disks: dict[str, str]) -> None:
        """Point disks of a defined VM at other images (e.g. a test-failover overlay)."""
        dom, root, vm = self._load(name)
        if self._active(dom):
            raise Conflict(f"VM {name} is running",
                           hint=f"stop it first: `vmreplica vm stop {name}`")
        targets = {d.target: d for d in vm.disks}
        for el in root.findall("devices/disk"):
            t = el.find("target")
            d = targets.get(t.get("dev")) if t is not None else None
            if d is None or d.name not in disks:
                continue
            src = el.find("source")
            if src is None:
                src = ET.SubElement(el, "source")
            src.attrib.clear()
            src.set("file", str(disks[d.name]))
            for bs in el.findall("backingStore"):
                el.remove(bs)
            d.path = str(disks[d.name])
            d.created = False   # an image the caller owns now
        self._redefine(root, vm)

    def add_owned(self, name: str, paths: list[str]) -> None:
        """Files or folders that belong to the VM from now on (deleted with it)."""
        _, root, vm = self._load(name)
        vm.owns = sorted(set(vm.owns) | {str(p) for p in paths})
        self._redefine(root, vm)

    def set_title(self, name: str, title: str, description: str | None = None) -> None:
        """The label libvirt tools show (virsh list --title, virt-manager): e.g. for a
        replica "replica of web1 on site-a". One line; the description is free text."""
        dom, root, vm = self._load(name)
        title = " ".join(title.split())
        _set_child_text(root, "title", title, 2)
        if description is not None:
            _set_child_text(root, "description", description, 3)
        self._redefine(root, vm)
        if self._active(dom):
            try:
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_TITLE, title, None, None,
                                libvirt.VIR_DOMAIN_AFFECT_LIVE)
                if description is not None:
                    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, description,
                                    None, None, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as e:
                log.warning("live title of %s: %s", name, _lv_error(e))

    def title(self, name: str) -> tuple[str, str]:
        _, _, vm = self._load(name)
        return vm.title, vm.description

    def delete(self, name: str) -> None:
        dom, _, vm = self._load(name)
        if self._active(dom):
            raise Conflict(f"VM {name} is running",
                           hint=f"stop it first: `vmreplica vm stop {name}`")
        vmdir = self._dir(name)
        owned = [Path(p) for p in vm.owns]

        def goes(path: Path) -> bool:
            return any(path == o or o in path.parents for o in owned + [vmdir])

        # Invariant 6: no bitmap left behind on images that outlive the VM.
        names = self._checkpoint_names(dom)
        for d in vm.disks:
            p = Path(d.path)
            if names and d.format == "qcow2" and p.exists() and not goes(p):
                have = {b.get("name") for b in _image_bitmaps(p)}
                for n in sorted(names & have):
                    try:
                        img.bitmap(p, ("--remove", n))
                    except HypervisorError as e:
                        log.warning("removing bitmap %s from %s: %s", n, p, e)
        try:
            dom.undefineFlags(UNDEFINE_FLAGS)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise HypervisorError(f"libvirt could not undefine {name}: {_lv_error(e)}") from None
        for p in owned:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for d in vm.disks:
            if d.created:
                Path(d.path).unlink(missing_ok=True)
        shutil.rmtree(vmdir, ignore_errors=True)
        for p in QEMU_LOG_DIR.glob(f"{vm.dom_name}.log*"):
            p.unlink(missing_ok=True)

    def _checkpoint_names(self, dom: libvirt.virDomain) -> set[str]:
        try:
            return {c.getName() for c in dom.listAllCheckpoints(0)}
        except libvirt.libvirtError:
            return set()

    # -- power -------------------------------------------------------------------------
    def start(self, name: str) -> None:
        dom, _, vm = self._load(name)
        if self._active(dom):
            return
        for d in vm.disks:
            if not Path(d.path).exists():
                raise HypervisorError(f"disk {d.name} of {name} is missing: {d.path}")
            _check_traversable(Path(d.path))
        vmdir = self._dir(name)
        self._mkdir_vm(vmdir)
        _check_traversable(vmdir / "console.log")
        console = vmdir / "console.log"
        if console.exists() and console.stat().st_size > (8 << 20):
            console.unlink()
        if vm.network == "isolated":
            self._ensure_isolated_network()
        try:
            dom.create()
        except libvirt.libvirtError as e:
            reason = _lv_error(e)
            if "lock" in reason.lower():
                reason += " (a replication cycle or another process holds the disk)"
            raise HypervisorError(f"libvirt could not start {name}: {reason}") from None
        if not self._active(dom):
            raise HypervisorError(f"libvirt started {name} but it stopped at once; see {console}")

    def _ensure_isolated_network(self) -> None:
        """A bridge with no address, no forward and no DHCP: VMs on it reach nothing but
        each other (libvirt also disables IPv6 on it). Shared by the hosts of this libvirtd."""
        try:
            net = self.conn.networkLookupByName(ISOLATED_NETWORK)
        except libvirt.libvirtError:
            xml = (f"<network><name>{ISOLATED_NETWORK}</name>"
                   f"<bridge name='{ISOLATED_BRIDGE}' stp='off'/></network>")
            try:
                net = self.conn.networkDefineXML(xml)
            except libvirt.libvirtError as e:
                try:
                    net = self.conn.networkLookupByName(ISOLATED_NETWORK)  # a racing define
                except libvirt.libvirtError:
                    raise HypervisorError(f"cannot define the isolated network: {_lv_error(e)}") from None
        try:
            if not net.isActive():
                net.create()
        except libvirt.libvirtError as e:
            if not net.isActive():
                raise HypervisorError(f"cannot start the isolated network: {_lv_error(e)}") from None

    def stop(self, name: str, force: bool = False, timeout: float = 60.0) -> None:
        """Shut down cleanly (guest agent, then ACPI), power off after ``timeout``; --force: at once."""
        dom, _, vm = self._load(name)
        if not self._active(dom):
            return
        if not force:
            asked = False
            if vm.agent:
                try:
                    dom.agentSetResponseTimeout(5)
                    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
                    asked = True
                except libvirt.libvirtError as e:
                    log.info("guest-agent shutdown of %s: %s", name, _lv_error(e))
            if not asked:
                try:
                    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                except libvirt.libvirtError as e:
                    log.info("ACPI shutdown of %s: %s", name, _lv_error(e))
            if _wait_inactive(dom, timeout):
                return
            log.warning("%s did not shut down within %.0f s: powering it off", name, timeout)
        try:
            dom.destroy()   # SIGTERM (QEMU stores persistent bitmaps), SIGKILL after 10 s
        except libvirt.libvirtError as e:
            if self._active(dom):
                raise HypervisorError(f"libvirt could not power off {name}: {_lv_error(e)}") from None
        _wait_inactive(dom, 15)

    # -- guest agent -----------------------------------------------------------------
    def agent_command(self, name: str, command: str, arguments: dict | None = None,
                      timeout: float = 10.0, expect_reply: bool = True):
        dom, _, vm = self._load(name)
        if not vm.agent:
            raise HypervisorError(f"VM {name} has no guest agent channel")
        if not self._active(dom):
            raise Conflict(f"VM {name} is not running")
        if command == "guest-shutdown" and not expect_reply:
            # guest-shutdown never answers: libvirt's own call knows how to wait for it.
            try:
                dom.agentSetResponseTimeout(max(1, int(timeout)))
                flags = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
                if (arguments or {}).get("mode") == "reboot":
                    dom.reboot(libvirt.VIR_DOMAIN_REBOOT_GUEST_AGENT)
                else:
                    dom.shutdownFlags(flags)
            except libvirt.libvirtError as e:
                raise HypervisorError(f"the guest agent did not take {command}: "
                                      f"{_lv_error(e)}") from None
            return None
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            raw = libvirt_qemu.qemuAgentCommand(dom, json.dumps(msg), max(1, int(round(timeout))), 0)
        except libvirt.libvirtError as e:
            if not expect_reply:
                return None
            text = _lv_error(e)
            if e.get_error_code() in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
                                      libvirt.VIR_ERR_AGENT_UNSYNCED) or "timeout" in text.lower():
                raise HypervisorError(f"the guest agent did not answer {command} within "
                                      f"{timeout:.0f} s ({text})") from None
            m = re.search(r"unable to execute QEMU agent command '[^']*': (.*)", text)
            if m:
                raise HypervisorError(f"guest agent refused {command}: {m.group(1)}") from None
            raise HypervisorError(f"guest agent command {command} failed: {text}") from None
        if not expect_reply:
            return None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise HypervisorError(f"the guest agent answered {command} with {raw!r}") from None
        if "error" in reply:
            raise HypervisorError(f"guest agent refused {command}: {reply['error'].get('desc')}")
        return reply.get("return")

    def freeze_filesystems(self, name: str, timeout: float = 15.0) -> None:
        """Quiesce the guest's file systems (qemu-guest-agent fsfreeze) for a consistent point."""
        self.agent_command(name, "guest-fsfreeze-freeze", timeout=timeout)

    def thaw_filesystems(self, name: str) -> None:
        self.agent_command(name, "guest-fsfreeze-thaw", timeout=10)

    # -- block access for change tracking -------------------------------------------
    def block_session(self, name: str) -> "LibvirtBlockSession":
        dom, _, vm = self._load(name)
        return LibvirtBlockSession(self, dom, vm)

    # -- continuous mode -------------------------------------------------------------
    # The domain's QEMU runs a write-blocking active mirror (`blockdev-mirror`, `sync:
    # none`, through qemuMonitorCommand) of every disk into a relay: a qemu-storage-daemon
    # of this host that holds the TLS connection to the replica's export with this host's
    # pinned credentials and serves it to QEMU on a unix socket. Why not libvirt's block
    # copy (virDomainBlockCopy with SYNCHRONOUS_WRITES): it always begins with a full copy
    # of the disk (there is no `sync: none`), so every start, and every return from
    # `degraded`, would read and send whole disks; and libvirt 9.0's NBD TLS is one
    # global certificate folder (qemu.conf nbd_tls_x509_cert_dir), which cannot hold one
    # pinned identity per replica host. The relay passes each write on and answers only
    # when the replica has answered (no cache), so a guest write is still acknowledged
    # only once it is on the replica. A replica that hangs is cut by killing the relay:
    # QEMU's connection to it ends at once, the waiting writes complete, the jobs stop
    # (paused, their own bitmaps keeping what the replica misses). Once the replica is
    # back a new relay takes the same socket, QEMU's NBD client reconnects to it at the
    # job's next request, and `block-job-resume` copies only what changed meanwhile.
    # QEMU's BLOCK_JOB_ERROR events reach a planned failover through libvirt-qemu's
    # monitor-event API (see _DomainMonitor), as they do on the qemu driver's monitor.

    def _pause_mark(self, name: str) -> Path:
        """Present while vmreplica holds the domain paused (continuous mode's hand-over):
        a daemon that dies meanwhile resumes it at its next start (resume_left_paused)."""
        return self.run_dir / f"lv-{hashlib.sha1(name.encode()).hexdigest()[:8]}.paused-by-vmreplica"

    def pause(self, name: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._pause_mark(name).write_text(name)
        self._run_state(name, "pause", lambda dom: dom.suspend())

    def resume(self, name: str) -> None:
        self._run_state(name, "resume", lambda dom: dom.resume())
        self._pause_mark(name).unlink(missing_ok=True)

    def resume_left_paused(self) -> list[str]:
        """At daemon start: resume the domains a dead daemon left paused."""
        done = []
        for mark in self.run_dir.glob("lv-*.paused-by-vmreplica"):
            name = mark.read_text().strip()
            try:
                dom, _, _ = self._load(name)
                if dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                    dom.resume()
                    done.append(name)
            except (HypervisorError, NotFound) as e:
                log.warning("resuming %s, left paused: %s", name, e)
            except libvirt.libvirtError as e:
                log.warning("resuming %s, left paused: %s", name, _lv_error(e))
            mark.unlink(missing_ok=True)
        return done

    def _run_state(self, name: str, verb: str, fn) -> None:
        dom, _, _ = self._load(name)
        try:
            fn(dom)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt could not {verb} {name}: {_lv_error(e)}") from None

    def watch_monitor(self, name: str) -> _DomainMonitor:
        dom, _, _ = self._load(name)
        if not self._active(dom):
            raise Conflict(f"VM {name} is not running")
        return _DomainMonitor(dom, name, self.uri)

    def _relay_dir(self, vm: _VM) -> Path:
        return self.run_dir / f"lv-{domain_uuid(vm.host, vm.uuid)[:8]}-mr"

    def _start_relay(self, name: str, dom: libvirt.virDomain, vm: _VM, disks: list[str],
                     target: dict) -> StorageDaemon:
        relay_dir = self._relay_dir(vm)
        self._stop_relay(name, relay_dir)
        relay_dir.mkdir(parents=True, exist_ok=True)
        blockdevs = [{"driver": "nbd", "node-name": f"r-{d}", "export": d,
                      "server": {"type": "inet", "host": target["host"],
                                 "port": str(target["port"])},
                      "tls-creds": "vmr-mtls", "tls-hostname": target["tls_hostname"],
                      "reconnect-delay": 0, "discard": "unmap"} for d in disks]
        exports = [{"type": "nbd", "id": f"e-{d}", "node-name": f"r-{d}", "name": d,
                    "writable": True} for d in disks]
        # SIGKILL when this daemon dies: the relay holds nothing to flush, and a clean
        # exit would wait for QEMU's connection to drain while the guest's writes wait
        # on it; killed, the connection ends, the guest goes on, the jobs pause until
        # the restarted daemon resumes them through a new relay.
        relay = StorageDaemon(relay_dir, "relay", blockdevs, exports, objects=[
            f"tls-creds-x509,id=vmr-mtls,dir={target['tls_dir']},endpoint=client,"
            "verify-peer=on"], death_signal="SIGKILL").start()
        try:
            ids = _qemu_ids(dom.XMLDesc(0))
            if ids is not None:
                os.chown(relay_dir, *ids)
                os.chown(relay.nbd_socket, *ids)
            os.chmod(relay_dir, 0o750)
            os.chmod(relay.nbd_socket, 0o660)
        except BaseException:
            relay.kill()
            raise
        with self._lock:
            self._relays[name] = relay
            self._targets[name] = (list(disks), dict(target))
        return relay

    def mirror_relay_socket(self, name: str) -> str | None:
        """Where the watchdog's probe goes: through the relay, like the mirror's writes."""
        relay = self._relays.get(name)
        return str(relay.nbd_socket) if relay is not None and self._relay_alive(name) else None

    def _relay_alive(self, name: str) -> bool:
        relay = self._relays.get(name)
        return relay is not None and relay.proc is not None and relay.proc.poll() is None

    def mirror_start(self, name: str, disks: list[str], target: dict) -> None:
        """As the qemu driver's (call it paused, right after a cycle): the relay first,
        then the mirror of each disk into it."""
        dom, _, vm = self._load(name)
        relay = self._start_relay(name, dom, vm, disks, target)
        try:
            with self.block_session(name) as session:
                nodes = {d: session._node(d) for d in disks}
            for d in disks:
                _passthrough(dom, "blockdev-add", {
                    "driver": "nbd", "node-name": f"vmr-mt-{d}", "export": d,
                    "server": {"type": "unix", "path": str(relay.nbd_socket)},
                    "reconnect-delay": 0, "discard": "unmap"})   # (see base.MIRROR_DISCARDS)
            for d in disks:
                _passthrough(dom, "blockdev-mirror", active_mirror(d, nodes[d], f"vmr-mt-{d}"))
        except BaseException:
            self.mirror_stop(name, disks)
            raise

    def mirror_status(self, name: str, mon=None) -> dict[str, dict]:
        """{disk: job}; while the relay is gone a job is reported failed even before a
        write finds out (the watchdog's probe goes to the replica, not through it)."""
        dom = mon.dom if mon is not None else self._load(name)[0]
        jobs = {j["device"][len("mirror-"):]: j for j in _passthrough(dom, "query-block-jobs")
                if j.get("device", "").startswith("mirror-")}
        if not self._relay_alive(name):
            for j in jobs.values():
                j["io-status"] = "failed"
        return jobs

    def mirror_yank(self, mon, disks: list[str]) -> bool:
        """Cut a replica that stopped answering: kill the relay (QEMU's connection to it
        ends, the guest's waiting writes complete, the jobs stop with an error). True:
        the jobs can be resumed through a new relay."""
        relay = self._relays.get(mon.vm)
        if relay is not None:
            relay.kill()
        return True

    def mirror_resume(self, name: str, disks: list[str], target: dict | None = None) -> None:
        """A new relay if the old one is gone (nothing happens while the replica is still
        unreachable: the next attempt tries again), then resume the jobs. ``target``: as
        given to mirror_start (a restarted daemon has only what its store recorded)."""
        dom, _, vm = self._load(name)
        if not self._relay_alive(name):
            known = self._targets.get(name)
            if known is None and target and target.get("tls_dir") and target.get("port"):
                known = (list(disks), target)
            if known is None:
                raise HypervisorError(f"the mirror of {name} has no relay to resume through")
            try:
                self._start_relay(name, dom, vm, *known)
            except HypervisorError as e:
                log.info("the mirror relay of %s cannot start yet: %s", name, e.message)
                return
        for d in disks:
            try:
                _passthrough(dom, "block-job-resume", {"device": f"mirror-{d}"})
            except HypervisorError:
                pass

    def mirror_stop(self, name: str, disks: list[str]) -> None:
        dom, _, vm = self._load(name)
        if self._active(dom):
            with self._guest_quiet(name, dom):
                self._end_jobs(name, dom, vm, disks)
        self._stop_relay(name, self._relay_dir(vm))
        with self._lock:
            self._targets.pop(name, None)

    @contextlib.contextmanager
    def _guest_quiet(self, name: str, dom: libvirt.virDomain):
        """The guest paused, its I/O drained, while its mirror jobs end (see
        base.QUIET_CANCEL); a pause held up by a replica that hangs is freed by cutting
        the relay (the waiting writes complete, the jobs stop with an error; the tracking
        bitmap has those writes). A guest that cannot be paused has its jobs ended as
        they are."""
        try:
            jobs = self.mirror_status(name)
            running = dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        except (HypervisorError, libvirt.libvirtError):
            jobs, running = {}, False
        if not jobs or not running:
            yield
            return
        cut = threading.Timer(QUIET_CANCEL_GUARD, self._cut_relay, (name,))
        cut.start()
        paused = time.monotonic()
        try:
            self.pause(name)
            held = True
        except HypervisorError as e:
            log.warning("ending the mirror of %s without a pause: %s", name, e.message)
            self._pause_mark(name).unlink(missing_ok=True)
            held = False
        finally:
            cut.cancel()
        try:
            yield
        finally:
            if held:
                self.resume(name)
                log.info("%s was paused %.3f s while its mirror jobs ended", name,
                         time.monotonic() - paused)

    def _cut_relay(self, name: str) -> None:
        relay = self._relays.get(name)
        if relay is not None:
            log.warning("pausing %s to end its mirror waited %.0f s on the replica: the "
                        "relay is cut", name, QUIET_CANCEL_GUARD)
            relay.kill()

    def _end_jobs(self, name: str, dom: libvirt.virDomain, vm: _VM, disks: list[str]) -> None:
        for d in disks:
            try:
                _passthrough(dom, "block-job-cancel", {"device": f"mirror-{d}",
                                                       "force": True})
            except HypervisorError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                jobs = _passthrough(dom, "query-block-jobs")
            except HypervisorError:
                break
            if not any(j.get("device", "").startswith("mirror-") for j in jobs):
                break
            if time.monotonic() > deadline - 10:
                self._stop_relay(name, self._relay_dir(vm))   # a job stuck on it
            time.sleep(0.05)
        for d in disks:
            try:
                _passthrough(dom, "blockdev-del", {"node-name": f"vmr-mt-{d}"})
            except HypervisorError:
                pass

    def _stop_relay(self, name: str, relay_dir: Path) -> None:
        with self._lock:
            relay = self._relays.pop(name, None)
        if relay is not None:
            try:
                relay.close(timeout=10)
            except HypervisorError as e:
                log.info("the mirror relay of %s: %s", name, e.message)
        if relay_dir.exists():
            from ..qemutools.qsd import reap
            reap(relay_dir)       # one an earlier daemon left (it dies with its daemon)

    def checkpoints(self, name: str) -> list[str]:
        """libvirt's checkpoints of a VM, oldest first (for operators and tests)."""
        dom, _, _ = self._load(name)
        try:
            cps = dom.listAllCheckpoints(0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: {_lv_error(e)}") from None
        return [c.getName() for c in sorted(cps, key=_creation_time)]


def _passthrough(dom: libvirt.virDomain, command: str, arguments: dict | None = None):
    """One QMP command to the domain's QEMU through libvirt (qemuMonitorCommand)."""
    msg = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    try:
        raw = libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0)
    except libvirt.libvirtError as e:
        raise HypervisorError(f"libvirt could not pass {command} to QEMU: {_lv_error(e)}") from None
    reply = json.loads(raw)
    if "error" in reply:
        raise QMPError(command, reply["error"].get("class", ""), reply["error"].get("desc", ""))
    return reply.get("return")


_event_loop: threading.Thread | None = None
_event_guard = threading.Lock()


def _ensure_event_loop() -> None:
    """libvirt delivers events only to connections opened after an event loop was
    registered; one thread runs it for the process."""
    global _event_loop
    with _event_guard:
        if _event_loop is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()

        _event_loop = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_loop.start()


class _DomainMonitor:
    """What the continuous-mode watchdog and a planned failover hold for a libvirt
    domain: QMP through libvirt (in band; a replica that hangs is cut at the relay, not
    with QEMU's out-of-band yank), and QEMU's block-job error events with the domain's
    end, through a connection of its own (libvirt-qemu's monitor-event API)."""

    EVENTS = ("BLOCK_JOB_ERROR",)

    def __init__(self, dom: libvirt.virDomain, vm: str, uri: str):
        self.dom, self.vm = dom, vm
        self.events: list[dict] = []
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        _ensure_event_loop()
        self._conn = None
        try:
            self._conn = libvirt.open(uri)
            d = self._conn.lookupByUUIDString(dom.UUIDString())
            self._ids = [libvirt_qemu.qemuMonitorEventRegister(self._conn, d, name,
                                                               self._on_event, None, 0)
                         for name in self.EVENTS]
            self._lifecycle = self._conn.domainEventRegisterAny(
                d, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        except libvirt.libvirtError as e:
            if self._conn is not None:
                self._conn.close()
            raise HypervisorError(f"libvirt cannot pass the events of {vm} on: "
                                  f"{_lv_error(e)}") from None
        if not _active(d):
            self._stopped.set()

    def _on_event(self, _conn, _dom, event, seconds, micros, details, _opaque):
        with self._lock:
            self.events.append({"event": event, "data": json.loads(details) if details else {},
                                "timestamp": {"seconds": seconds, "microseconds": micros}})

    def _on_lifecycle(self, _conn, _dom, event, _detail, _opaque):
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self._stopped.set()

    def execute(self, command: str, arguments: dict | None = None, timeout: float | None = None):
        return _passthrough(self.dom, command, arguments)

    def wait_event(self, name: str, timeout: float, match=None) -> dict:
        """Return (and consume) the first event ``name``; HypervisorError once QEMU is
        gone and none is left (as a QMP monitor that closes), or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for i, ev in enumerate(self.events):
                    if ev["event"] == name and (match is None or match(ev)):
                        return self.events.pop(i)
            if self._stopped.is_set():
                raise HypervisorError(f"QEMU of {self.vm} is gone")
            if time.monotonic() >= deadline:
                raise HypervisorError(f"QEMU did not report {name} within {timeout:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            for cb in self._ids:
                libvirt_qemu.qemuMonitorEventDeregister(self._conn, cb)
            self._conn.domainEventDeregisterAny(self._lifecycle)
            self._conn.close()
        except libvirt.libvirtError:
            pass


def _active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def _creation_time(cp) -> tuple[int, str]:
    try:
        root = ET.fromstring(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        return int(root.findtext("creationTime") or 0), cp.getName()
    except (libvirt.libvirtError, ET.ParseError, ValueError):
        return 0, cp.getName()


def _wait_inactive(dom: libvirt.virDomain, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not dom.isActive():
                return True
        except libvirt.libvirtError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _qemu_ids(live_xml: str | None = None) -> tuple[int, int] | None:
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


def _check_traversable(path: Path) -> None:
    """Every folder above ``path`` must let QEMU (libvirt-qemu) through."""
    ids = _qemu_ids()
    if ids is None or ids[0] == 0:
        return
    uid, gid = ids
    try:
        groups = set(os.getgrouplist(QEMU_USER, gid))
    except (KeyError, OSError):
        groups = {gid}
    for d in list(path.absolute().parents)[::-1]:
        try:
            st = d.stat()
        except OSError:
            return
        mode = st.st_mode
        ok = (mode & stat.S_IXOTH or (st.st_uid == uid and mode & stat.S_IXUSR)
              or (st.st_gid in groups and mode & stat.S_IXGRP))
        if not ok:
            raise HypervisorError(
                f"QEMU runs as {QEMU_USER} and cannot enter {d} (mode {stat.S_IMODE(mode):o})",
                hint=f"make it traversable: chmod o+x {d} (host homes must be on paths "
                     "libvirt-qemu can traverse)")


def _image_bitmaps(path: Path) -> list[dict]:
    try:
        return img.bitmaps(path)
    except HypervisorError:
        return []


# -- change tracking -----------------------------------------------------------------------

class LibvirtBlockSession:
    """Change-tracking access to a domain's disks: libvirt checkpoints and pull-mode
    backups while it runs, a qemu-storage-daemon on the same bitmaps while it is off."""

    per_disk_bitmaps = False  # a checkpoint spans its disks: it goes as a whole

    def __init__(self, driver: LibvirtDriver, dom: libvirt.virDomain, vm: _VM):
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
        if self.running:
            self.nbd_socket = self._socket_path()
            self._end_stale_backup()
        else:
            blockdevs = []
            for d in vm.disks:
                if d.format == "qcow2":
                    blockdevs += qcow2_node(d.path, d.name)
                else:
                    blockdevs += [{"driver": "file", "filename": d.path,
                                   "node-name": f"{d.name}-file"},
                                  {"driver": "raw", "file": f"{d.name}-file", "node-name": d.name}]
            short = domain_uuid(vm.host, vm.uuid)[:8]
            self.qsd = StorageDaemon(driver.run_dir, f"lv-{short}-bs", blockdevs).start()
            self.nbd_socket = str(self.qsd.nbd_socket)

    # -- plumbing --------------------------------------------------------------------------
    def _socket_path(self) -> str:
        path = self.vmdir / "run" / "nbd.sock"
        if len(str(path)) > MAX_SOCKET_PATH - 4:
            path = self.driver.run_dir / f"lv-{domain_uuid(self.vm.host, self.vm.uuid)[:8]}" / "nbd.sock"
        return str(path)

    def _qmp(self, command: str, arguments: dict | None = None):
        if self.qsd is not None:
            return self.qsd.qmp.execute(command, arguments)
        return _passthrough(self.dom, command, arguments)

    def _transaction(self, actions: list[dict]) -> None:
        if actions:
            self._qmp("transaction", {"actions": actions})

    def _nodes(self) -> dict[str, dict]:
        """vmreplica disk name → its format node (with ``dirty-bitmaps``)."""
        nodes = self._qmp("query-named-block-nodes", {"flat": True})
        if self.qsd is not None:
            return {n["node-name"]: n for n in nodes if n.get("node-name") in self.disks}
        # libvirt's format node of each disk: the node whose image is the disk's file and
        # whose name is libvirt's own (filters such as copy-before-write are unnamed '#…')
        live = ET.fromstring(self.dom.XMLDesc(0))
        paths = {}
        for el in live.findall("devices/disk"):
            t, s = el.find("target"), el.find("source")
            if t is not None and s is not None:
                paths[t.get("dev")] = s.get("file")
        out = {}
        for d in self.disks.values():
            path = paths.get(d.target, d.path)
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
            raise HypervisorError(f"libvirt: {_lv_error(e)}") from None
        for cp in cps:
            try:
                root = ET.fromstring(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
            except libvirt.libvirtError:
                continue  # deleted meanwhile
            out[cp.getName()] = {d.get("name"): d.get("bitmap") or cp.getName()
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
                out.append(_info(name, b))
        for name, b in sorted(on_disk.items()):
            if name not in seen and b.get("persistent"):
                out.append(_info(name, b))
        return out

    # -- freeze --------------------------------------------------------------------------
    def freeze(self, disks: list[str], since: str | None, new: str | None) -> dict[str, Export]:
        """Fix a point-in-time view of ``disks`` exported over NBD (with the changes since
        checkpoint ``since`` as its dirty-bitmap context) and start checkpoint ``new``."""
        if self._backup or self._exports:
            raise HypervisorError(f"a frozen view of {self.vm.name} is already exported")
        unknown = [x for x in disks if x not in self.disks]
        if unknown:
            raise HypervisorError(f"VM {self.vm.name} has no disk {unknown[0]}")
        if since:
            raw = [x for x in disks if self.disks[x].format != "qcow2"]
            if raw:
                raise TrackingError(f"disk {raw[0]} of {self.vm.name} is raw: it cannot hold "
                                    "a persistent dirty bitmap")
            self._require_checkpoint(disks, since)
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
                                  f"{self.vm.name}: {_lv_error(e)}") from None

    def _freeze_running(self, disks: list[str], since: str | None,
                        new: str | None) -> dict[str, Export]:
        live_xml = self.dom.XMLDesc(0)
        sock = Path(self.nbd_socket)
        sock.parent.mkdir(parents=True, exist_ok=True)
        ids = _qemu_ids(live_xml)
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
                el = ET.SubElement(bdisks, "disk", {"name": d.target, "backup": "yes",
                                                   "type": "file"})
                ET.SubElement(el, "scratch", {"file": str(scratch)})
            else:
                ET.SubElement(bdisks, "disk", {"name": d.target, "backup": "no"})
        checkpoint = None
        if new:
            targets = {self.disks[x].target for x in disks if self.disks[x].format == "qcow2"}
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
                                    f"{since}: {_lv_error(e)}") from None
            raise HypervisorError(f"libvirt could not freeze {self.vm.name}: {_lv_error(e)}") from None
        self._backup = True
        exports = {}
        try:
            for x in disks:
                d = self.disks[x]
                size = int(self.dom.blockInfo(d.target)[0])
                exports[x] = Export(str(sock), d.target, size,
                                    f"qemu:dirty-bitmap:backup-{d.target}" if since else None)
        except libvirt.libvirtError as e:
            self.unexport()
            raise HypervisorError(f"libvirt: {_lv_error(e)}") from None
        return exports

    def _freeze_off(self, disks: list[str], since: str | None,
                    new: str | None) -> dict[str, Export]:
        actions, temp = [], []
        targets = set()
        for x in disks:
            d = self.disks[x]
            if new and d.format == "qcow2":
                actions.append({"type": "block-dirty-bitmap-add",
                                "data": {"node": x, "name": new, "persistent": True}})
                targets.add(d.target)
            if since:
                # QEMU exports no enabled bitmap read-only: a frozen copy, named like libvirt's.
                tmp = f"backup-{d.target}"
                actions += [{"type": "block-dirty-bitmap-add",
                             "data": {"node": x, "name": tmp, "persistent": False,
                                      "disabled": True}},
                            {"type": "block-dirty-bitmap-merge",
                             "data": {"node": x, "target": tmp, "bitmaps": [since]}}]
                temp.append((x, tmp))
        try:
            self._transaction(actions)
        except QMPError as e:
            if "exists" in e.desc.lower():
                raise HypervisorError(f"bitmap {new} already exists on {self.vm.name}: {e.desc}") from None
            raise
        self._temp = temp
        if new and targets:
            try:
                self._redefine_checkpoint(new, targets)
            except BaseException:
                self._transaction([{"type": "block-dirty-bitmap-remove",
                                    "data": {"node": x, "name": new}}
                                   for x in disks if self.disks[x].target in targets])
                self._drop_temp()
                raise
        exports = {}
        try:
            nodes = self._nodes()
            for x in disks:
                d = self.disks[x]
                args = {"type": "nbd", "id": f"exp-{x}", "node-name": x, "name": d.target,
                        "writable": False}
                if since:
                    args["bitmaps"] = [f"backup-{d.target}"]
                self._qmp("block-export-add", args)
                self._exports.append(f"exp-{x}")
                size = int(nodes[x].get("image", {}).get("virtual-size") or d.virtual_size)
                exports[x] = Export(self.nbd_socket, d.target, size,
                                    f"qemu:dirty-bitmap:backup-{d.target}" if since else None,
                                    image=d.path, image_format=d.format)
        except BaseException:
            self.unexport()
            raise
        return exports

    # -- end of a frozen view --------------------------------------------------------------
    def unexport(self) -> None:
        if self._backup:
            try:
                self.dom.abortJob()   # ends the pull backup: NBD server, scratch, temp bitmaps
            except libvirt.libvirtError as e:
                log.warning("ending the backup of %s: %s", self.vm.name, _lv_error(e))
            self._wait_no_backup()
            self._backup = False
            self._remove_scratch()
            Path(self.nbd_socket).unlink(missing_ok=True)
        if self.qsd is not None:
            for ex in self._exports:
                try:
                    self._qmp("block-export-del", {"id": ex})
                except HypervisorError as e:
                    log.warning("removing export %s: %s", ex, e)
            if self._exports:
                self._wait_exports_gone()
            self._exports = []
            self._drop_temp()

    def _drop_temp(self) -> None:
        for node, name in self._temp:
            try:
                self._qmp("block-dirty-bitmap-remove", {"node": node, "name": name})
            except HypervisorError as e:
                log.warning("removing bitmap %s: %s", name, e)
        self._temp = []

    def _wait_exports_gone(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                left = self._qmp("query-block-exports")
            except HypervisorError:
                return
            if not any(e.get("id", "").startswith("exp-") for e in left):
                return
            time.sleep(0.01)

    def _wait_no_backup(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.dom.backupGetXMLDesc(0)
            except libvirt.libvirtError:
                return    # no backup job any more
            time.sleep(0.02)
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
                log.warning("ending it failed: %s", _lv_error(e))
            self._wait_no_backup()
            for p in self.vmdir.glob("scratch-*.qcow2"):
                p.unlink(missing_ok=True)

    # -- checkpoints -------------------------------------------------------------------
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
                                  f"{self.vm.name}: {_lv_error(e)}") from None

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
            actions += [{"type": "block-dirty-bitmap-remove",
                         "data": {"node": nodes[x]["node-name"], "name": n}}
                        for n in names if n in have]
        self._transaction(actions)

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
                                          f"{self.vm.name}: {_lv_error(e)}") from None
                log.info("checkpoint %s of %s has no bitmap on %s: removing its metadata",
                         name, self.vm.name, ", ".join(missing))
        # Off (libvirt 9.0 cannot delete a checkpoint of an inactive domain): metadata
        # first, then the bitmaps (release() removes them) — a crash in between leaves a
        # plain bitmap the tracker folds in, never a checkpoint without its bitmap.
        try:
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt could not delete checkpoint {name} of "
                                  f"{self.vm.name}: {_lv_error(e)}") from None

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
                actions.append({"type": "block-dirty-bitmap-enable",
                                "data": {"node": node, "name": since}})
                if n and not n.get("inconsistent"):
                    actions.append({"type": "block-dirty-bitmap-merge",
                                    "data": {"node": node, "target": since, "bitmaps": [new]}})
        self._transaction(actions)
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
                actions.append({"type": "block-dirty-bitmap-enable",
                                "data": {"node": node, "name": target}})
            good = [s for s in srcs if s in have and not have[s].get("inconsistent")]
            if good:
                actions.append({"type": "block-dirty-bitmap-merge",
                                "data": {"node": node, "target": target, "bitmaps": good}})
        self._transaction(actions)
        if srcs:
            self.release(disks, srcs)

    # -- end ---------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self.unexport()
        finally:
            if self.qsd is not None:
                self.qsd.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _info(name: str, b: dict) -> BitmapInfo:
    return BitmapInfo(name, bool(b.get("recording")), bool(b.get("persistent")),
                      bool(b.get("inconsistent")), int(b.get("count", 0)),
                      int(b.get("granularity", 65536)))
