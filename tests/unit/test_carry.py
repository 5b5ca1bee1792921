"""Carrying an existing domain's whole XML to its replica (hypervisor.libvirt.carry):
what is kept, what changes, what is refused. Pure: XML in, XML out."""
import xml.etree.ElementTree as ET

import pytest

from vmreplica.errors import UsageError
from vmreplica.hypervisor.libvirt.carry import NetTarget, carry, nics, uncarriable
from vmreplica.hypervisor.libvirt.domainxml import DiskDef, VMDef, domain_uuid, parse

# As virt-install leaves a UEFI guest (trimmed): two disks, a CD-ROM, two NICs, agent.
OPERATOR_XML = """<domain type='kvm'>
  <name>web1</name>
  <uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>
  <genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90e</genid>
  <metadata><libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0"><libosinfo:os id="http://debian.org/debian/12"/></libosinfo:libosinfo></metadata>
  <memory unit='KiB'>2097152</memory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os>
  <cpu mode='host-model' check='partial'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/var/lib/libvirt/images/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/vg0/web1-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/scratch.qcow2'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/isos/debian-12.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:01'/>
      <source network='default'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:02'/>
      <source bridge='br0'/>
      <model type='e1000e'/>
    </interface>
    <serial type='file'><source path='/var/log/web1-serial.log'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web1.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <graphics type='vnc' port='5901' autoport='no' listen='127.0.0.1'/>
    <video><model type='virtio' heads='1' primary='yes'/></video>
  </devices>
</domain>"""


def replica_vm(disks=None) -> VMDef:
    return VMDef(dom_name="vmr-site-b-web1", name="web1",
                 uuid="1b4e28ba-2fa1-11d2-883f-0016d3cca427", host="site-b", home="/srv/b",
                 memory_mb=2048, guest=None, agent=True, network="none", created_at=1.0,
                 disks=disks if disks is not None else [
                     DiskDef("vda", "vda", "/store/web1/vda/head.qcow2", "qcow2", 8 << 30),
                     DiskDef("vdb", "vdb", "/store/web1/vdb/head.qcow2", "qcow2", 4 << 30)],
                 carried=True)


NETS = {"default": NetTarget("network", "dr-lan"), "br0": NetTarget("bridge", "br-dr")}


def test_the_whole_vm_is_carried_with_its_disks_on_the_replicas_heads():
    root, notes = carry(OPERATOR_XML, replica_vm(), NETS, "/srv/b/vms/web1/console.log")
    # Identity: never the primary's (both may share one libvirtd).
    assert root.findtext("name") == "vmr-site-b-web1"
    assert root.findtext("uuid") == domain_uuid("site-b", "1b4e28ba-2fa1-11d2-883f-0016d3cca427")
    assert root.find("genid") is None
    # Kept as it is: type, CPU, vCPUs, memory, machine, loader, video, the agent channel.
    assert root.get("type") == "kvm" and root.find("cpu").get("mode") == "host-model"
    assert root.findtext("vcpu") == "2" and root.findtext("memory") == "2097152"
    assert root.find("os/type").get("machine") == "pc-q35-7.2"
    assert root.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert root.find("devices/video/model").get("type") == "virtio"
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"
    assert root.find("metadata/{http://libosinfo.org/xmlns/libvirt/domain/1.0}libosinfo") \
        is not None
    # Disks: the replicated ones on the heads as qcow2 files, no chain; others left out.
    disks = {d.find("target").get("dev"): d for d in root.findall("devices/disk")}
    assert sorted(disks) == ["sda", "vda", "vdb"]
    for dev in ("vda", "vdb"):
        d = disks[dev]
        assert d.get("type") == "file" and d.find("driver").get("type") == "qcow2"
        assert d.find("source").attrib == {"file": f"/store/web1/{dev}/head.qcow2"}
        assert d.find("backingStore") is None and d.find("driver").get("io") is None
    assert disks["vda"].find("driver").get("cache") == "none"
    assert disks["vda"].find("address").get("bus") == "0x04"      # guest-visible slot kept
    assert disks["sda"].find("source") is None                     # media ejected
    assert "disk vdc: not replicated, left out" in notes
    assert any("cdrom sda" in n for n in notes)
    # NICs: mapped, MAC and model kept, the host's tap name gone.
    ifs = root.findall("devices/interface")
    assert [(i.get("type"), i.find("source").attrib, i.find("mac").get("address"),
             i.find("model").get("type")) for i in ifs] == [
        ("network", {"network": "dr-lan"}, "52:54:00:aa:bb:01", "virtio"),
        ("bridge", {"bridge": "br-dr"}, "52:54:00:aa:bb:02", "e1000e")]
    assert ifs[0].find("target") is None
    # Host paths libvirt must pick per domain; NVRAM from the template (a note).
    assert "path" not in root.find("devices/channel/source").attrib
    assert root.find("devices/serial/source").get("path") == "/srv/b/vms/web1/console.log"
    g = root.find("devices/graphics")
    assert g.get("autoport") == "yes" and g.get("port") is None
    nvram = root.find("os/nvram")
    assert nvram is not None and not nvram.text
    assert nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    assert any("NVRAM" in n for n in notes)
    # vmreplica reads it back as a carried VM of site-b.
    _, vm = parse(ET.tostring(root, encoding="unicode"))
    assert vm is not None and vm.carried and vm.host == "site-b"
    assert [(d.name, d.path) for d in vm.disks] == [("vda", "/store/web1/vda/head.qcow2"),
                                                    ("vdb", "/store/web1/vdb/head.qcow2")]


def test_a_nic_without_a_mapping_is_refused_with_the_flag_to_add():
    with pytest.raises(UsageError) as e:
        carry(OPERATOR_XML, replica_vm(), {"default": NetTarget("network", "x")}, "/c")
    assert "52:54:00:aa:bb:02 on bridge br0" in e.value.message
    assert "--network-map br0=DST" in (e.value.hint or "")


def test_every_nic_on_one_network_or_none():
    root, _ = carry(OPERATOR_XML, replica_vm(), {"*": NetTarget("network", "iso")}, "/c")
    assert [i.find("source").get("network") for i in root.findall("devices/interface")] \
        == ["iso", "iso"]
    root, notes = carry(OPERATOR_XML, replica_vm(), {"*": None}, "/c")
    assert root.findall("devices/interface") == []
    assert sum("left out" in n and "NIC" in n for n in notes) == 2


@pytest.mark.parametrize("device,why", [
    (("<hostdev mode='subsystem' type='pci'><source><address bus='0x01' slot='0x00'/>"
      "</source></hostdev>"), "host device passed through (pci)"),
    ("<filesystem type='mount'><source dir='/srv/share'/><target dir='share'/></filesystem>",
     "host folder shared into the guest (share)"),
    ("<interface type='hostdev'><mac address='52:54:00:00:00:09'/></interface>",
     "NIC 52:54:00:00:00:09 of type hostdev"),
    ("<tpm model='tpm-tis'><backend type='passthrough'/></tpm>", "passed-through TPM"),
])
def test_what_cannot_be_carried_is_refused(device, why):
    xml = OPERATOR_XML.replace("<video>", device + "<video>")
    assert any(why in w for w in uncarriable(ET.fromstring(xml)))
    with pytest.raises(UsageError, match="cannot be carried"):
        carry(xml, replica_vm(), {"*": None}, "/c")


def test_nics_are_listed_with_their_sources():
    assert [(n.mac, n.kind, n.source) for n in nics(ET.fromstring(OPERATOR_XML))] == [
        ("52:54:00:aa:bb:01", "network", "default"), ("52:54:00:aa:bb:02", "bridge", "br0")]
