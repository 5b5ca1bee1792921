"""The libvirt driver's inventory and power: this host's VMs (``list_vms`` shows the
domains whose metadata names this host's home, and the connection's existing domains —
an operator's, without vmreplica metadata — by their libvirt name, origin "existing";
domains with another home's metadata stay hidden), creating and defining them, their
disks, labels and owned files, deleting them; start, stop, pause, resume. Domains are
never autostarted. An existing domain is never redefined, renamed or deleted: ``delete``,
``set_disks``, ``replace_disks``, ``add_owned`` and ``set_title`` refuse it.

Files:

    HOME/vms/NAME/                 the VM folder (mode 0755)
    HOME/vms/NAME/diskN.FMT        disks made by `vm create` (deleted with the VM)
    HOME/vms/NAME/console.log      the serial console (written by libvirt, root 0600)
    HOME/vms/NAME/vm.json          a copy of the description (see _describe_to_folder)

Permissions: QEMU runs as ``libvirt-qemu``. Every directory above a disk image must be
traversable by it (a host home under /tmp with mode 0755 works; ``mktemp -d`` folders,
mode 0700, do not): ``start`` checks and says which directory is not. libvirt's
``dynamic_ownership`` (Debian's default, /etc/libvirt/qemu.conf is never edited) chowns
images and scratch files to libvirt-qemu while the domain runs and gives them back to
root when it stops, so files our daemon creates as root (overlays, replica heads) need
nothing more. AppArmor is not active on these machines; with it, libvirt's
virt-aa-helper labels the same files.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from ...errors import Conflict, HypervisorError, NotFound, Unsupported, UsageError
from ...qemutools import img
from ..base import DefinitionUpdate, VMInfo
from ..guest import guest_files
from .carry import (
    ALL_NICS,
    MAPPABLE_NICS,
    NetTarget,
    carry,
    carry_disks,
    definition_changes,
    nics,
)
from .connection import QEMU_USER, LibvirtBase, lv_error, qemu_ids
from .domainxml import (
    ISOLATED_BRIDGE,
    ISOLATED_NETWORK,
    DiskDef,
    VMDef,
    domain_uuid,
    parse,
    repoint_disks,
    set_child_text,
    target_of,
)

log = logging.getLogger("vmreplica.libvirt")

QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
ASK_AGAIN = 5.0      # seconds between shutdown requests to a guest that has not stopped
UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                  | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                  | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


class Inventory(LibvirtBase):
    # -- inventory ---------------------------------------------------------------------
    def list_vms(self) -> list[VMInfo]:
        """This host's vmreplica VMs, and the existing domains (no vmreplica metadata) of
        the connection not shadowed by a vmreplica VM of the same name."""
        out, existing = [], []
        try:
            doms = self.conn.listAllDomains(0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: {lv_error(e)}") from None
        for dom in doms:
            try:
                root, vm = parse(self._xml(dom))
                if vm is None:
                    existing.append((dom, root))
                elif self._ours(vm) and dom.name() == self.domain_name(vm.name):
                    out.append(self._info(dom, vm))
            except (HypervisorError, libvirt.libvirtError, ET.ParseError):
                continue  # undefined meanwhile
        names = {i.name for i in out}
        for dom, root in existing:
            try:
                if dom.name() not in names:
                    out.append(self._info(dom, self._existing(dom, root)))
            except (HypervisorError, libvirt.libvirtError):
                continue
        return sorted(out, key=lambda i: i.name)

    def inspect(self, name: str) -> VMInfo:
        dom, _, vm = self._load(name)
        return self._info(dom, vm)

    def describe(self, name: str) -> dict:
        """Portable description: what another host needs to define the same VM."""
        dom, _, vm = self._load(name)
        desc = {"name": vm.name, "uuid": vm.uuid, "memory_mb": vm.memory_mb,
                "guest": vm.guest, "agent": vm.agent, "network": vm.network or "none",
                "disks": [{"name": d.name, "format": d.format, "virtual_size": d.virtual_size}
                          for d in vm.disks]}
        if vm.existing or vm.carried:
            # The whole domain goes with it: the replica is defined from this XML
            # (hypervisor.libvirt.carry), not from the fields above; its disks are named
            # by their target dev.
            desc["definition"] = self._xml(dom)
        return desc

    def nvram_path(self, name: str) -> str | None:
        _, root, _ = self._load(name)
        el = root.find("os/nvram")
        if el is None:
            return None
        src = el.find("source")         # (newer libvirt: <nvram type='file'><source file=...)
        text = (src.get("file") if src is not None else None) or (el.text or "").strip()
        return text or None

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
            _, vm = parse(self._xml(dom))
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
                  guest: str | None = None, disk_format: str = "qcow2",
                  share_rw: bool = False) -> VMInfo:
        if share_rw:
            raise Unsupported("--share-rw (for `vm io`) needs the qemu driver")
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
                disks.append(DiskDef(f"disk{i}", target_of(i), str(path), disk_format,
                                     int(size), created=True))
            vm = VMDef(dom_name=self.domain_name(name), name=name, uuid=identity,
                       host=self.host_name, home=str(self.home), memory_mb=int(memory_mb),
                       guest=guest, agent=guest is not None, network="none",
                       created_at=time.time(), disks=disks)
            dom = self._define(vm)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        return self._info(dom, vm)

    def define_vm(self, desc: dict) -> VMInfo:
        """Define a VM whose disks already exist (a replica, a failed-over VM). A
        description with a ``definition`` (an existing domain's XML, or a carried VM's)
        is carried whole (``_define_carried``)."""
        name = desc["name"]
        for d in desc["disks"]:
            if not d.get("path"):
                raise UsageError(f"disk {d['name']} of {name} has no path")
        if desc.get("definition"):
            return self._define_carried(desc)
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
        vm = VMDef(dom_name=self.domain_name(name), name=name, uuid=identity,
                   host=self.host_name, home=str(self.home),
                   memory_mb=int(desc.get("memory_mb") or 256),
                   guest=desc.get("guest"), agent=bool(desc.get("agent")), network=network,
                   created_at=time.time(),
                   # Files and folders outside the VM folder that belong to this VM and go
                   # with it when it is deleted (a replica's storage, say).
                   owns=[str(p) for p in desc.get("owns") or []],
                   disks=[DiskDef(d["name"], target_of(i), str(d["path"]),
                                  d.get("format", "qcow2"), int(d["virtual_size"]))
                          for i, d in enumerate(desc["disks"])],
                   title=desc.get("title") or "", description=desc.get("description") or "")
        try:
            dom = self._define(vm)
        except BaseException:
            shutil.rmtree(vmdir, ignore_errors=True)
            raise
        return self._info(dom, vm)

    def _define_carried(self, desc: dict) -> VMInfo:
        """A VM defined from another domain's whole XML (hypervisor.libvirt.carry): its
        NICs on the networks ``desc["network_map"]`` maps their sources to (a libvirt
        network or bridge of this host; "isolated": vmreplica's isolated network; None:
        the NIC is left out; key "*": every NIC), its disks on ``desc["disks"]``."""
        name = desc["name"]
        definition = str(desc["definition"])
        identity = desc.get("uuid") or str(uuidlib.uuid4())
        self._check_free(name, identity)
        source = ET.fromstring(definition)
        nets = self._resolve_networks(source, desc.get("network_map") or {}, name)
        vmdir = self._dir(name)
        vm = VMDef(dom_name=self.domain_name(name), name=name, uuid=identity,
                   host=self.host_name, home=str(self.home),
                   memory_mb=int(desc.get("memory_mb") or 0), guest=None,
                   agent=bool(desc.get("agent")),
                   network="isolated" if any(t is not None and t.name == ISOLATED_NETWORK
                                             for t in nets.values()) else "none",
                   created_at=time.time(),
                   owns=[str(p) for p in desc.get("owns") or []],
                   disks=[DiskDef(d["name"], d.get("target") or d["name"], str(d["path"]),
                                  d.get("format", "qcow2"), int(d["virtual_size"]))
                          for d in desc["disks"]],
                   title=desc.get("title") or "", description=desc.get("description") or "",
                   carried=True)
        root, notes = carry(definition, vm, nets, str(vmdir / "console.log"),
                            str(vmdir / "VARS.fd"))
        notes += self._check_runnable(root, name)
        if vmdir.exists() and any(vmdir.iterdir()):
            raise Conflict(f"a VM folder {vmdir} already exists on this host",
                           hint="delete the leftover folder, or choose another name")
        self._mkdir_vm(vmdir)
        try:
            dom = self._define_xml(ET.tostring(root, encoding="unicode"), name)
            self._describe_to_folder(vm)
        except BaseException:
            shutil.rmtree(vmdir, ignore_errors=True)
            raise
        _, vm2 = parse(self._xml(dom))
        info = self._info(dom, vm2 or vm)
        info.notes = notes
        return info

    def follow_definition(self, name: str, definition: str,
                          network_map: dict[str, str]) -> DefinitionUpdate:
        """The replica VM ``name`` (carried) defined again from its primary's new XML:
        carried as at creation (``carry``), with this VM's name, uuid, title, description,
        metadata and disks (by target dev: ``replace_disks`` has made them follow first),
        its NICs on ``network_map``. A running VM (failed over, say) is not touched
        (Conflict); what cannot be carried, a NIC with no mapping, or what this host
        lacks to run it is refused (UsageError) and the old definition stays."""
        dom, root, vm = self._load(name)
        if not vm.carried:
            raise Conflict(f"{name} is not defined from its primary's domain: its "
                           "definition does not follow the primary's")
        if self._active(dom):
            raise Conflict(f"{name} is running on {self.host_name}: its definition is not "
                           "changed while it runs")
        try:
            source = ET.fromstring(definition)
        except ET.ParseError as e:
            raise UsageError(f"the primary's definition of {name} is not XML: {e}") from None
        nets = self._resolve_networks(source, network_map, name)
        new, notes = carry(definition, vm, nets, str(self._dir(name) / "console.log"),
                           str(self._dir(name) / "VARS.fd"))
        notes += self._check_runnable(new, name)
        # (where its NICs go was said when it was made; a new NIC's says its change line)
        notes = [n for n in notes if not (n.startswith("NIC ") and " -> " in n)]
        changes = definition_changes(root, new)
        self._define_xml(ET.tostring(new, encoding="unicode"), name)
        self._describe_to_folder(vm)
        return DefinitionUpdate(changes, notes)

    def _resolve_networks(self, root: ET.Element, mapping: dict,
                          name: str) -> dict[str, NetTarget | None]:
        """The targets on this host of the NIC sources ``root`` uses, from ``mapping``
        (source → a libvirt network or bridge name, "isolated", or None)."""
        used = {n.source for n in nics(root) if n.kind in MAPPABLE_NICS}
        out: dict[str, NetTarget | None] = {}
        for src, dst in mapping.items():
            if src != ALL_NICS and src not in used:
                continue        # (a server-wide default this VM does not need)
            if dst is None or dst == "":
                out[src] = None
            elif dst == "isolated":
                out[src] = NetTarget("network", ISOLATED_NETWORK)
            else:
                out[src] = self._net_target(str(dst), name)
        return out

    def _net_target(self, dst: str, vm: str) -> NetTarget:
        try:
            self.conn.networkLookupByName(dst)
            return NetTarget("network", dst)
        except libvirt.libvirtError:
            pass
        if Path(f"/sys/class/net/{dst}/bridge").is_dir():
            return NetTarget("bridge", dst)
        try:
            networks = sorted(self.conn.listNetworks() + self.conn.listDefinedNetworks())
        except libvirt.libvirtError:
            networks = []
        bridges = sorted(p.parent.name for p in Path("/sys/class/net").glob("*/bridge"))
        raise UsageError(f"{self.host_name} has no libvirt network or bridge named {dst!r} "
                         f"(the network map of {vm})",
                         hint=f"its networks: {', '.join(networks) or 'none'}; its bridges: "
                              f"{', '.join(bridges) or 'none'}")

    def _check_runnable(self, root: ET.Element, name: str) -> list[str]:
        """What this host lacks to run a carried definition (firmware, kernel files) is
        refused; what it runs differently is a note."""
        notes = []
        for tag in ("os/loader", "os/kernel", "os/initrd"):
            el = root.find(tag)
            if el is not None and el.text and el.text.strip() \
                    and not Path(el.text.strip()).exists():
                raise UsageError(f"{self.host_name} cannot run {name}: its "
                                 f"{tag.split('/')[1]} {el.text.strip()} is missing here",
                                 hint="install the same firmware or files on this host "
                                      "(OVMF: apt-get install ovmf)")
        if root.get("type") == "kvm" and self.accel_setting == "tcg":
            root.set("type", "qemu")
            notes.append(f"runs under TCG (host {self.host_name} is set to accel tcg)")
        return notes

    def replace_disks(self, name: str, disks: list[dict]) -> None:
        """Give a stopped VM another list of disks ({name, path, format, virtual_size}),
        in guest order (a replica whose set of replicated disks changed)."""
        dom, root, vm = self._load(name)
        if self._active(dom):
            raise Conflict(f"VM {name} is running")
        if vm.carried:      # its own XML, edited: disks by target dev
            vm.disks = [DiskDef(d["name"], d.get("target") or d["name"], str(d["path"]),
                                d.get("format", "qcow2"), int(d["virtual_size"]))
                        for d in disks]
            keep = {d.target for d in vm.disks}
            devices = root.find("devices")
            for el in root.findall("devices/disk"):
                t = el.find("target")
                if el.get("device", "disk") == "disk" and t is not None \
                        and t.get("dev") not in keep and devices is not None:
                    devices.remove(el)
            carry_disks(root, vm)
            self._redefine(root, vm)
            return
        vm.disks = [DiskDef(d["name"], target_of(i), str(d["path"]), d.get("format", "qcow2"),
                            int(d["virtual_size"])) for i, d in enumerate(disks)]
        self._define(vm)

    def set_disks(self, name: str, disks: dict[str, str]) -> None:
        """Point disks of a defined VM at other images (e.g. a test-failover overlay)."""
        dom, root, vm = self._load(name)
        if self._active(dom):
            raise Conflict(f"VM {name} is running",
                           hint=f"stop it first: `vmreplica vm stop {name}`")
        repoint_disks(root, vm, disks)
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
        set_child_text(root, "title", title, 2)
        if description is not None:
            set_child_text(root, "description", description, 3)
        self._redefine(root, vm)
        if self._active(dom):
            try:
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_TITLE, title, None, None,
                                libvirt.VIR_DOMAIN_AFFECT_LIVE)
                if description is not None:
                    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, description,
                                    None, None, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as e:
                log.warning("live title of %s: %s", name, lv_error(e))

    def title(self, name: str) -> tuple[str, str]:
        _, _, vm = self._load(name)
        return vm.title, vm.description

    def delete(self, name: str) -> None:
        dom, _, vm = self._load(name)
        if vm.existing:
            raise Conflict(f"{name} is an existing libvirt domain (vmreplica did not create "
                           "it): vmreplica never deletes or undefines it",
                           hint=f"`vmreplica remove {name}` ends its replication; to delete "
                                f"the domain itself use libvirt's tools (`virsh undefine "
                                f"{name}`)")
        if self._active(dom):
            raise Conflict(f"VM {name} is running",
                           hint=f"stop it first: `vmreplica vm stop {name}`")
        vmdir = self._dir(name)
        owned = [Path(p) for p in vm.owns]

        def goes(path: Path) -> bool:
            return any(path == o or o in path.parents for o in owned + [vmdir])

        # Invariant 6: no bitmap left behind on images that outlive the VM.
        names = _checkpoint_names(dom)
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
                raise HypervisorError(f"libvirt could not undefine {name}: {lv_error(e)}") from None
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
        if vm.network == "isolated":
            self._release_isolated_network()

    # -- power -------------------------------------------------------------------------
    def start(self, name: str) -> None:
        dom, _, vm = self._load(name)
        if self._active(dom):
            return
        for d in vm.disks:
            if d.kind != "file":
                continue
            if not Path(d.path).exists():
                raise HypervisorError(f"disk {d.name} of {name} is missing: {d.path}")
            _check_traversable(Path(d.path))
        vmdir = self._dir(name)
        console = vmdir / "console.log"     # (an existing domain has its own console)
        if not vm.existing:
            self._mkdir_vm(vmdir)
            _check_traversable(console)
            if console.exists() and console.stat().st_size > (8 << 20):
                console.unlink()
        if vm.network == "isolated":
            self._ensure_isolated_network()
        try:
            dom.create()
        except libvirt.libvirtError as e:
            reason = lv_error(e)
            if "lock" in reason.lower():
                reason += " (a replication cycle or another process holds the disk)"
            raise HypervisorError(f"libvirt could not start {name}: {reason}") from None
        if not self._active(dom):
            where = QEMU_LOG_DIR / f"{dom.name()}.log" if vm.existing else console
            raise HypervisorError(f"libvirt started {name} but it stopped at once; see {where}")

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
                    raise HypervisorError(f"cannot define the isolated network: {lv_error(e)}") from None
        try:
            if not net.isActive():
                net.create()
        except libvirt.libvirtError as e:
            if not net.isActive():
                raise HypervisorError(f"cannot start the isolated network: {lv_error(e)}") from None

    def _release_isolated_network(self) -> None:
        """The isolated network goes with the last domain defined on it (it is made on
        demand by ``start``): a test failover leaves nothing behind."""
        on_it = f"network='{ISOLATED_NETWORK}'"
        try:
            doms = self.conn.listAllDomains(0)
        except libvirt.libvirtError as e:
            log.info("isolated network left in place: %s", lv_error(e))
            return
        for d in doms:
            try:
                if on_it in d.XMLDesc(0) or on_it in d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE):
                    log.info("isolated network %s kept: domain %s is on it",
                             ISOLATED_NETWORK, d.name())
                    return          # (still in use)
            except libvirt.libvirtError:
                continue            # undefined meanwhile (another host's VM on this libvirtd)
        try:
            net = self.conn.networkLookupByName(ISOLATED_NETWORK)
            if net.isActive():
                net.destroy()
            if net.isPersistent():
                net.undefine()
        except (libvirt.libvirtError, HypervisorError) as e:
            log.info("isolated network left in place: %s", e)

    def stop(self, name: str, force: bool = False, timeout: float = 60.0) -> None:
        """Shut down cleanly (guest agent, then ACPI), power off after ``timeout``; --force: at once."""
        dom, _, vm = self._load(name)
        if not self._active(dom):
            return
        if not force:
            # Asked again every few seconds: a guest still booting has no agent yet and
            # ignores the power button until its init handles it (systemd-logind).
            deadline = time.monotonic() + timeout
            while True:
                asked = False
                if vm.agent:
                    try:
                        dom.agentSetResponseTimeout(5)
                        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
                        asked = True
                    except libvirt.libvirtError as e:
                        log.info("guest-agent shutdown of %s: %s", name, lv_error(e))
                if not asked:
                    try:
                        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                    except libvirt.libvirtError as e:
                        log.info("ACPI shutdown of %s: %s", name, lv_error(e))
                left = deadline - time.monotonic()
                if _wait_inactive(dom, min(ASK_AGAIN, max(left, 0))):
                    return
                if time.monotonic() >= deadline:
                    break
            log.warning("%s did not shut down within %.0f s: powering it off", name, timeout)
        try:
            dom.destroy()   # SIGTERM (QEMU stores persistent bitmaps), SIGKILL after 10 s
        except libvirt.libvirtError as e:
            if self._active(dom):
                raise HypervisorError(f"libvirt could not power off {name}: {lv_error(e)}") from None
        _wait_inactive(dom, 15)

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
                log.warning("resuming %s, left paused: %s", name, lv_error(e))
            mark.unlink(missing_ok=True)
        return done


def _checkpoint_names(dom: libvirt.virDomain) -> set[str]:
    try:
        return {c.getName() for c in dom.listAllCheckpoints(0)}
    except libvirt.libvirtError:
        return set()


def _image_bitmaps(path: Path) -> list[dict]:
    try:
        return img.bitmaps(path)
    except HypervisorError:
        return []


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


def _check_traversable(path: Path) -> None:
    """Every folder above ``path`` must let QEMU (libvirt-qemu) through."""
    ids = qemu_ids()
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
