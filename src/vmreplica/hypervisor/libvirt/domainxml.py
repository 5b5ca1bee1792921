"""A vmreplica VM as a libvirt domain's XML: the record read back from a domain's
persistent definition (``VMDef``, its disks ``DiskDef``), the vmreplica metadata element,
and the domain XML written for a VM. No libvirt calls: text in, text out.

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

Existing domains (an operator's, without vmreplica metadata: ``existing_vm``) keep their
libvirt name as the VM's name and their domain uuid as its identity; their disks are
their ``<disk device='disk'>`` elements, each named by its target dev (vda, vdb, ...),
with the source (a file's path, a block device's node) and libvirt's disk type as
``kind``. vmreplica never writes their XML.
"""

from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import HypervisorError
from ..guest import guest_files

NS = "https://vmreplica.example/ns/1"
ET.register_namespace("vmr", NS)
ISOLATED_NETWORK = "vmreplica-isolated"
ISOLATED_BRIDGE = "vmr-isolated"
AGENT_PORT = "org.qemu.guest_agent.0"


def vmr(tag: str) -> str:
    """A tag of vmreplica's metadata namespace."""
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


@dataclass
class DiskDef:
    name: str
    target: str
    path: str
    format: str
    virtual_size: int
    created: bool = False
    kind: str = "file"   # libvirt's disk type: file, block, network, volume, ...

    @property
    def checkpointed(self) -> bool:
        """Tracked by libvirt checkpoints: a qcow2 image file, which can keep persistent
        dirty bitmaps. Any other disk (a raw file, a block device) holds no bitmap and is
        tracked by the hash scan (domain.tracking.SCAN)."""
        return self.kind == "file" and self.format == "qcow2"


@dataclass
class VMDef:
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
    disks: list[DiskDef] = field(default_factory=list)
    owns: list[str] = field(default_factory=list)
    title: str = ""
    description: str = ""
    # An operator's domain without vmreplica metadata, taken as it is (existing_vm):
    # never redefined, renamed or deleted by vmreplica.
    existing: bool = False
    # A VM defined from another domain's full XML (hypervisor.libvirt.carry): the
    # replica of an existing domain, its failed-over or test VM. Its XML is edited in
    # place, never regenerated from these fields.
    carried: bool = False
    nics: list[str] = field(default_factory=list)   # MAC of each NIC, in order

    def disk(self, name: str) -> DiskDef:
        for d in self.disks:
            if d.name == name:
                return d
        raise HypervisorError(f"VM {self.name} has no disk {name}")


def parse(xml: str) -> tuple[ET.Element, VMDef | None]:
    root = ET.fromstring(xml)
    meta = root.find(f"metadata/{vmr('vm')}")
    if meta is None:
        return root, None

    def text(tag: str, default: str = "") -> str:
        el = meta.find(vmr(tag))
        return (el.text or "").strip() if el is not None and el.text else default

    # (vmreplica wrote this XML: its disks have a name and a target, their sources a file)
    sources: dict[str, str] = {}
    for d in root.findall("devices/disk"):
        t = d.find("target")
        s = d.find("source")
        if t is not None:
            sources[t.get("dev", "")] = s.get("file", "") if s is not None else ""
    disks = []
    for d in meta.findall(f"{vmr('disks')}/{vmr('disk')}"):
        disks.append(DiskDef(d.get("name", ""), d.get("target", ""), sources.get(d.get("target", ""), ""),
                             d.get("format", "qcow2"), int(d.get("virtual-size", "0")),
                             d.get("created") == "yes"))
    title = root.find("title")
    desc = root.find("description")
    try:
        created = float(text("created-at", "0") or 0)
    except ValueError:
        created = 0.0
    vm = VMDef(dom_name=root.findtext("name", ""), name=text("name"), uuid=text("uuid"),
               host=text("host"), home=text("home"), memory_mb=_memory_mb(root),
               guest=text("guest") or None, agent=text("agent") == "yes",
               network=text("network", "none") or "none", created_at=created, disks=disks,
               carried=text("carried") == "yes", nics=nic_macs(root),
               owns=[(p.text or "") for p in meta.findall(f"{vmr('owns')}/{vmr('path')}")],
               title=title.text if title is not None and title.text else "",
               description=desc.text if desc is not None and desc.text else "")
    return root, vm


def _memory_mb(root: ET.Element) -> int:
    mem = root.find("memory")
    if mem is None or not mem.text:
        return 0
    # (libvirt writes it back in KiB, whatever unit it was defined with)
    kib = int(mem.text) * {"KiB": 1, "MiB": 1024, "GiB": 1 << 20, "k": 1, "M": 1024,
                           "G": 1 << 20}.get(mem.get("unit", "KiB"), 1)
    return kib // 1024


SOURCE_ATTRS = {"file": "file", "block": "dev", "dir": "dir", "volume": "volume",
                "network": "name"}


def existing_disks(root: ET.Element, sizes: dict[str, int] | None = None) -> list[DiskDef]:
    """The ``<disk device='disk'>`` elements of a domain's XML, in their order, each named
    by its target dev; ``sizes`` gives virtual sizes by target (libvirt knows them, the
    XML does not). A disk without a driver type is raw (libvirt's default). CD-ROMs,
    floppies and LUN pass-through are not disks to replicate and are left out."""
    sizes = sizes or {}
    out = []
    for el in root.findall("devices/disk"):
        if el.get("device", "disk") != "disk":
            continue
        target = el.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if not dev:
            continue
        kind = el.get("type", "file")
        src = el.find("source")
        path = ""
        if src is not None:
            path = src.get(SOURCE_ATTRS.get(kind, "file"), "") or ""
            if kind == "network" and src.get("protocol"):
                path = f"{src.get('protocol')}:{path}"
        drv = el.find("driver")
        fmt = (drv.get("type") if drv is not None else None) or "raw"
        out.append(DiskDef(dev, dev, path, fmt, int(sizes.get(dev, 0)), kind=kind))
    return out


def nic_macs(root: ET.Element) -> list[str]:
    """The MAC address of each NIC of a domain, in order ("" where it has none yet)."""
    out = []
    for el in root.findall("devices/interface"):
        mac = el.find("mac")
        out.append((mac.get("address", "") if mac is not None else "").lower())
    return out


def existing_vm(root: ET.Element, host: str, home: str,
                sizes: dict[str, int] | None = None) -> VMDef:
    """An operator's domain (no vmreplica metadata) as a VM of host ``host``: its libvirt
    name, its domain uuid as identity, its disks (existing_disks), a guest agent if it has
    the agent's channel. Its network is not carried yet ("none")."""
    agent = any(t.get("name") == AGENT_PORT for t in root.findall("devices/channel/target"))
    name = root.findtext("name", "")
    title = root.find("title")
    desc = root.find("description")
    return VMDef(dom_name=name, name=name, uuid=(root.findtext("uuid") or "").strip(),
                 host=host, home=home, memory_mb=_memory_mb(root), guest=None, agent=agent,
                 network="none", created_at=0.0, disks=existing_disks(root, sizes),
                 title=title.text if title is not None and title.text else "",
                 description=desc.text if desc is not None and desc.text else "",
                 existing=True, nics=nic_macs(root))


def meta_element(vm: VMDef) -> ET.Element:
    m = ET.Element(vmr("vm"), {"version": "1"})
    for tag, value in (("name", vm.name), ("uuid", vm.uuid), ("host", vm.host),
                       ("home", vm.home), ("guest", vm.guest or ""),
                       ("agent", "yes" if vm.agent else "no"), ("network", vm.network),
                       ("created-at", repr(vm.created_at)),
                       ("carried", "yes" if vm.carried else "no")):
        ET.SubElement(m, vmr(tag)).text = value
    disks = ET.SubElement(m, vmr("disks"))
    for d in vm.disks:
        ET.SubElement(disks, vmr("disk"), {"name": d.name, "target": d.target,
                                           "format": d.format,
                                           "virtual-size": str(d.virtual_size),
                                           "created": "yes" if d.created else "no"})
    owns = ET.SubElement(m, vmr("owns"))
    for p in vm.owns:
        ET.SubElement(owns, vmr("path")).text = p
    return m


def set_child_text(parent: ET.Element, tag: str, text: str, index: int) -> None:
    el = parent.find(tag)
    if el is None:
        el = ET.Element(tag)
        parent.insert(index, el)
    el.text = text


def repoint_disks(root: ET.Element, vm: VMDef, paths: dict[str, str]) -> None:
    """Point the disks named in ``paths`` at other image files, in the persistent XML
    ``root`` and in ``vm`` (images the caller owns from now on: not deleted with it)."""
    targets = {d.target: d for d in vm.disks}
    for el in root.findall("devices/disk"):
        t = el.find("target")
        d = targets.get(t.get("dev", "")) if t is not None else None
        if d is None or d.name not in paths:
            continue
        src = el.find("source")
        if src is None:
            src = ET.SubElement(el, "source")
        src.attrib.clear()
        src.set("file", str(paths[d.name]))
        for bs in el.findall("backingStore"):
            el.remove(bs)
        d.path = str(paths[d.name])
        d.created = False


def domain_xml(vm: VMDef, domain_type: str, console: Path) -> ET.Element:
    """The domain XML of ``vm`` (libvirt type ``domain_type``: kvm or qemu), its serial
    console written to ``console``."""
    root = ET.Element("domain", {"type": domain_type})
    ET.SubElement(root, "name").text = vm.dom_name
    ET.SubElement(root, "uuid").text = domain_uuid(vm.host, vm.uuid)
    ET.SubElement(root, "title").text = vm.title or f"{vm.name} (vmreplica VM of {vm.host})"
    ET.SubElement(root, "description").text = vm.description or (
        f"vmreplica VM {vm.name} (identity {vm.uuid}) of host {vm.host}, home {vm.home}. "
        "Managed by vmreplica: change it with vmreplica, not virsh.")
    meta = ET.SubElement(root, "metadata")
    meta.append(meta_element(vm))
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
    if domain_type == "kvm":
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
    ET.SubElement(serial, "source", {"path": str(console)})
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
