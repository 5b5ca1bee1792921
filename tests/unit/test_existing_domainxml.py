"""An operator's domain XML (no vmreplica metadata) read as a VM: domainxml.existing_vm
and existing_disks (pure: text in, records out)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from vmreplica.hypervisor.libvirt.domainxml import existing_disks, existing_vm, parse

XML = """<domain type='kvm'>
  <name>web-01</name>
  <uuid>6f1c1a2e-4c55-4bb1-9a57-0d5f9e3f2a10</uuid>
  <title>the web server</title>
  <memory unit='KiB'>2097152</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web.qcow2'/>
      <backingStore type='file'><format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/isos/debian.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/srv/scratch.img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/img'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>"""


def test_an_existing_domain_has_no_vmreplica_metadata():
    root, vm = parse(XML)
    assert vm is None and root.findtext("name") == "web-01"


def test_disks_are_named_by_target_with_their_kind_and_format():
    disks = existing_disks(ET.fromstring(XML), {"vda": 10 << 30, "vdb": 5 << 30})
    assert [(d.name, d.target, d.kind, d.format, d.path, d.virtual_size) for d in disks] == [
        ("vda", "vda", "file", "qcow2", "/var/lib/libvirt/images/web.qcow2", 10 << 30),
        ("vdb", "vdb", "block", "raw", "/dev/vg0/data", 5 << 30),
        ("vdc", "vdc", "file", "raw", "/srv/scratch.img", 0),     # no driver type: raw
        ("vdd", "vdd", "network", "raw", "rbd:pool/img", 0),
    ]                                                              # the CD-ROM is left out


def test_the_vm_keeps_the_domains_name_and_uuid():
    vm = existing_vm(ET.fromstring(XML), "site-a", "/h/a")
    assert vm.existing and vm.name == vm.dom_name == "web-01"
    assert vm.uuid == "6f1c1a2e-4c55-4bb1-9a57-0d5f9e3f2a10"
    assert (vm.host, vm.home, vm.memory_mb, vm.agent, vm.guest, vm.network) == \
        ("site-a", "/h/a", 2048, True, None, "none")
    assert vm.title == "the web server" and vm.owns == []


def test_no_agent_channel_no_agent():
    xml = XML.replace("org.qemu.guest_agent.0", "org.example.other")
    assert existing_vm(ET.fromstring(xml), "h", "/h").agent is False


def test_the_nics_macs_in_order():
    nics = ("<interface type='network'><mac address='52:54:00:AA:00:01'/>"
            "<source network='lan'/></interface><interface type='bridge'>"
            "<source bridge='br0'/></interface>")
    xml = XML.replace("<channel type='unix'>", nics + "<channel type='unix'>")
    assert existing_vm(ET.fromstring(xml), "h", "/h").nics == ["52:54:00:aa:00:01", ""]
    assert existing_vm(ET.fromstring(XML), "h", "/h").nics == []
