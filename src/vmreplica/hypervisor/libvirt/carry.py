"""Carrying a whole domain to another host: the replica VM of an operator's existing
libvirt domain is defined from the primary's full domain XML, not from vmreplica's
four-field description. No libvirt calls: text in, an element tree and notes out.

What is carried as it is: vCPUs and CPU model, memory, machine type, firmware (BIOS or
UEFI loader), features, clock, NICs with their MAC addresses and models, video, sound,
serial and channel devices (the guest-agent channel), input, RNG, watchdog, the
operator's other metadata.

What changes, and why:

    name, uuid      vmr-<host>-<vm> and uuid5("<host>/<identity>") (domainxml.domain_uuid):
                    a replica never collides with its primary, even on one libvirtd
    title, desc.    say whose replica it is; vmreplica's metadata element is added
    disks           every replicated disk (by target dev) becomes a qcow2 file disk on
                    the replica's head, its backing chain and host-side attributes gone;
                    a disk that is not replicated is left out (a note says so)
    CD-ROM/floppy   their media (host paths) are ejected (a note)
    NICs            moved to the mapped network or bridge (``NetTarget``), MAC and model
                    kept; a NIC whose source has no mapping is refused (UsageError), not
                    found missing on the day of a disaster
    NVRAM           the path goes (libvirt makes one per domain from the template); the
                    variables are not replicated yet: a note says so
    host paths      a unix channel's socket path, a file serial/console, a graphics
                    port: per-domain values libvirt picks (two domains on one host must
                    not share them)

What cannot be carried is refused (``uncarriable``): host devices passed through (PCI,
USB, mediated, SCSI), host folders shared into the guest (virtiofs/9p), NICs that are a
host device or a vhost-user/vDPA port, a passed-through TPM.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ...errors import UsageError
from .domainxml import VMDef, domain_uuid, meta_element, vmr

# NIC types a mapping can move (their source names the network, bridge or host device)
MAPPABLE_NICS = {"network": "network", "bridge": "bridge", "direct": "dev"}
# NIC types carried as they are (nothing of the host in them)
PLAIN_NICS = {"user"}
ALL_NICS = "*"       # a mapping key for every NIC (test failover's isolated network)


@dataclass(frozen=True)
class NetTarget:
    """Where a NIC goes on the replica host: a libvirt network or a host bridge."""
    kind: str        # network | bridge
    name: str


@dataclass(frozen=True)
class Nic:
    """A NIC of a domain: its MAC, libvirt interface type and source (network, bridge or
    host device name; "" for a user-mode NIC)."""
    mac: str
    kind: str
    source: str

    @property
    def where(self) -> str:
        return f"{self.kind} {self.source}" if self.source else self.kind


def nics(root: ET.Element) -> list[Nic]:
    out = []
    for el in root.findall("devices/interface"):
        kind = el.get("type", "")
        mac_el = el.find("mac")
        src = el.find("source")
        attr = MAPPABLE_NICS.get(kind)
        source = (src.get(attr, "") if src is not None and attr else "") or ""
        out.append(Nic(mac_el.get("address", "") if mac_el is not None else "", kind, source))
    return out


def uncarriable(root: ET.Element) -> list[str]:
    """Why this domain cannot be carried to another host (empty: it can)."""
    why = []
    for el in root.findall("devices/hostdev"):
        why.append(f"a host device passed through ({el.get('type', 'device')})")
    for el in root.findall("devices/filesystem"):
        tgt = el.find("target")
        why.append("a host folder shared into the guest"
                   + (f" ({tgt.get('dir')})" if tgt is not None and tgt.get("dir") else ""))
    for nic in nics(root):
        if nic.kind not in MAPPABLE_NICS and nic.kind not in PLAIN_NICS:
            why.append(f"NIC {nic.mac or '?'} of type {nic.kind} (a host-side device)")
    for el in root.findall("devices/tpm/backend"):
        if el.get("type") == "passthrough":
            why.append("a passed-through TPM")
    return why


def nic_target(nic: Nic, nets: dict[str, NetTarget | None]) -> NetTarget | None:
    """The mapped target of ``nic`` (``ALL_NICS`` first); KeyError when unmapped."""
    if ALL_NICS in nets:
        return nets[ALL_NICS]
    return nets[nic.source]


def unmapped(root: ET.Element, nets: dict[str, NetTarget | None]) -> list[Nic]:
    """The NICs with a source and no mapping in ``nets``."""
    out = []
    for nic in nics(root):
        if nic.kind in MAPPABLE_NICS:
            try:
                nic_target(nic, nets)
            except KeyError:
                out.append(nic)
    return out


def carry(definition: str, vm: VMDef, nets: dict[str, NetTarget | None],
          console: str) -> tuple[ET.Element, list[str]]:
    """The domain XML of ``vm`` (a replica, a failed-over or test VM) from another
    domain's XML ``definition``: its disks on ``vm.disks`` (matched by target dev), its
    NICs on ``nets`` (source → target; None: the NIC is left out), a file serial console
    at ``console``. Returns the element tree and notes (what was changed or left out).
    Raises UsageError for what cannot be carried or a NIC without a mapping."""
    root = ET.fromstring(definition)
    if root.tag != "domain":
        raise UsageError("not a libvirt domain definition")
    why = uncarriable(root)
    if why:
        raise UsageError(f"{vm.name} cannot be carried to another host: {'; '.join(why)}",
                         hint="remove it from the domain (`virsh edit`), or replicate "
                              "another VM")
    missing = unmapped(root, nets)
    if missing:
        raise UsageError(
            f"{vm.name} has NICs with no network mapping: "
            + ", ".join(f"{n.mac} on {n.where}" for n in missing),
            hint="map each source: --network-map " + " --network-map ".join(
                sorted({f"{n.source}=DST" for n in missing})))
    notes: list[str] = []
    _identity(root, vm)
    notes += carry_disks(root, vm)
    notes += _nics(root, nets)
    notes += _host_paths(root, console)
    return root, notes


def _set(root: ET.Element, tag: str, text: str, index: int) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.Element(tag)
        root.insert(index, el)
    el.text = text


def _identity(root: ET.Element, vm: VMDef) -> None:
    _set(root, "name", vm.dom_name, 0)
    _set(root, "uuid", domain_uuid(vm.host, vm.uuid), 1)
    _set(root, "title", vm.title or f"{vm.name} (vmreplica VM of {vm.host})", 2)
    _set(root, "description", vm.description or (
        f"vmreplica VM {vm.name} (identity {vm.uuid}) of host {vm.host}, home {vm.home}, "
        "defined from its primary's domain. Managed by vmreplica."), 3)
    for tag in ("genid",):        # a VM generation ID is the primary's own
        for el in root.findall(tag):
            root.remove(el)
    meta = root.find("metadata")
    if meta is None:
        meta = ET.Element("metadata")
        root.insert(4, meta)
    for old in meta.findall(vmr("vm")):
        meta.remove(old)
    meta.append(meta_element(vm))


def carry_disks(root: ET.Element, vm: VMDef) -> list[str]:
    """Point the disks of ``root`` at ``vm.disks`` (by target dev); notes."""
    notes = []
    by_target = {d.target: d for d in vm.disks}
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    for el in list(devices.findall("disk")):
        target = el.find("target")
        dev = target.get("dev", "") if target is not None else ""
        device = el.get("device", "disk")
        if device in ("cdrom", "floppy"):
            if el.find("source") is not None:
                notes.append(f"{device} {dev}: its media (a host file) was ejected")
                el.remove(el.find("source"))  # type: ignore[arg-type]
            for bs in el.findall("backingStore"):
                el.remove(bs)
            el.set("type", "file")
            continue
        d = by_target.pop(dev, None)
        if d is None:
            devices.remove(el)
            notes.append(f"disk {dev}: not replicated, left out")
            continue
        set_file_disk(el, d.path, d.format)
    for d in by_target.values():        # (a disk the definition lacks: added)
        el = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(el, "driver", {"name": "qemu", "type": d.format})
        ET.SubElement(el, "source", {"file": d.path})
        ET.SubElement(el, "target", {"dev": d.target, "bus": "virtio"})
    return notes


def set_file_disk(el: ET.Element, path: str, fmt: str) -> None:
    """Make a ``<disk>`` element an image file ``path`` of format ``fmt``: its source,
    driver type and disk type; its backing chain and the host-side attributes of its
    old source go."""
    el.set("type", "file")
    drv = el.find("driver")
    if drv is None:
        drv = ET.Element("driver", {"name": "qemu"})
        el.insert(0, drv)
    drv.set("type", fmt)
    for attr in ("io",):             # io='native' needs cache=none on a file; drop it
        drv.attrib.pop(attr, None)
    src = el.find("source")
    if src is None:
        src = ET.Element("source")
        el.insert(1, src)
    src.attrib.clear()
    for child in list(src):
        src.remove(child)
    src.set("file", path)
    for bs in el.findall("backingStore"):
        el.remove(bs)


def _nics(root: ET.Element, nets: dict[str, NetTarget | None]) -> list[str]:
    notes = []
    devices = root.find("devices")
    for el, nic in zip(list(root.findall("devices/interface")), nics(root), strict=True):
        if nic.kind not in MAPPABLE_NICS:
            continue
        target = nic_target(nic, nets)
        if target is None:
            assert devices is not None
            devices.remove(el)
            notes.append(f"NIC {nic.mac} ({nic.where}): left out")
            continue
        el.set("type", target.kind)
        src = el.find("source")
        if src is None:
            src = ET.Element("source")
            el.insert(1, src)
        src.attrib.clear()
        src.set(MAPPABLE_NICS[target.kind], target.name)
        for tag in ("target", "virtualport"):   # vnetN, an Open vSwitch port: host-side
            for child in el.findall(tag):
                el.remove(child)
        if (nic.kind, nic.source) != (target.kind, target.name):
            notes.append(f"NIC {nic.mac}: {nic.where} -> {target.kind} {target.name}")
    return notes


def _host_paths(root: ET.Element, console: str) -> list[str]:
    notes = []
    for el in root.findall("devices/channel"):
        src = el.find("source")
        if el.get("type") == "unix" and src is not None and src.get("path"):
            del src.attrib["path"]          # libvirt picks one per domain
    for tag in ("serial", "console"):
        for el in root.findall(f"devices/{tag}"):
            src = el.find("source")
            if el.get("type") == "file" and src is not None:
                src.set("path", console)
            for log in el.findall("log"):
                el.remove(log)
    for el in root.findall("devices/graphics"):
        if el.get("port") and el.get("port") != "-1":
            notes.append(f"graphics {el.get('type')}: port {el.get('port')} -> automatic")
        for attr in ("port", "tlsPort", "websocket"):
            el.attrib.pop(attr, None)
        if el.get("type") in ("vnc", "spice"):
            el.set("autoport", "yes")
    nvram = root.find("os/nvram")
    if nvram is not None:
        nvram.text = None               # libvirt makes <name>_VARS.fd from the template
        for attr in ("type",):
            nvram.attrib.pop(attr, None)
        for child in list(nvram):
            nvram.remove(child)
        notes.append("UEFI variables (NVRAM) are not replicated yet: this VM starts "
                     "from the firmware's template")
    for el in root.findall("devices/tpm"):
        notes.append(f"TPM ({el.get('model', 'tpm')}): its state is not replicated")
    return notes
