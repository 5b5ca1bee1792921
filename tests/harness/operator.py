"""An operator's libvirt objects in tests: what their own tooling (virsh define,
virt-install) makes and what the tests read back from libvirt — never through vmreplica.
Shared by the existing-domain tests and the benchmarks."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vmreplica.hypervisor.guest import guest_files

URI = "qemu:///system"


def virsh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def inactive_xml(name: str) -> str:
    return virsh("dumpxml", "--inactive", name).stdout


def checkpoints(name: str) -> list[str]:
    return [x for x in virsh("checkpoint-list", name, "--name").stdout.split() if x]


def undefine(name: str) -> None:
    """Power off and undefine domain ``name`` (with its checkpoints' metadata), if any."""
    if virsh("domstate", name, check=False).returncode != 0:
        return
    virsh("destroy", name, check=False)
    virsh("undefine", name, "--checkpoints-metadata", check=False)


def network(name: str, bridge: str, work: Path) -> None:
    """A transient libvirt network: a bridge, no forwarding, no address."""
    (work / f"{name}.xml").write_text(
        f"<network><name>{name}</name><bridge name='{bridge}'/></network>\n")
    virsh("net-create", str(work / f"{name}.xml"))


def network_users(name: str) -> list[str]:
    """The domains (running or not) with a NIC on libvirt network ``name``."""
    users = []
    for dom in virsh("list", "--all", "--name", check=False).stdout.split():
        xml = virsh("dumpxml", dom, check=False).stdout + \
            virsh("dumpxml", "--inactive", dom, check=False).stdout
        if f"network='{name}'" in xml:
            users.append(dom)
    return users


def demo_domain_xml(name: str, disks: list[tuple[str, str, str, str]],
                    acpi: bool = False, nics: list[tuple[str, str]] | None = None) -> str:
    """A domain booting the demo guest's kernel and initramfs, as an operator writes it:
    (libvirt disk type, source, format, target) of each disk; with ``acpi`` the guest
    gets ACPI, so it powers off cleanly at the power button (a shutdown, a planned
    failover's `--prepare --shutdown`), else only a power-off stops it; a virtio NIC on
    libvirt network NET with MAC for each (NET, MAC) of ``nics`` (the demo guest does not
    use it: it is there to be carried)."""
    g = guest_files("demo")
    devs = ""
    for kind, src, fmt, target in disks:
        attr = "dev" if kind == "block" else "file"
        source = f"<source {attr}='{src}'/>" if kind != "network" else \
            f"<source protocol='nbd' name='{src}'><host name='127.0.0.1' port='10809'/></source>"
        devs += (f"<disk type='{kind}' device='disk'><driver name='qemu' type='{fmt}'/>"
                 f"{source}<target dev='{target}' bus='virtio'/></disk>")
    for net, mac in nics or []:
        devs += (f"<interface type='network'><mac address='{mac}'/><source network='{net}'/>"
                 "<model type='virtio'/></interface>")
    features = "<features><acpi/></features>" if acpi else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{g['kernel']}</kernel><initrd>{g['initrd']}</initrd>
    <cmdline>{g['cmdline']}</cmdline></os>
  {features}
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>
  <devices>{devs}<memballoon model='none'/></devices>
</domain>"""
