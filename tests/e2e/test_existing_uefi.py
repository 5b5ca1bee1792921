"""UEFI variables travel with the replica (issue 19): an operator's domain with OVMF
firmware and an NVRAM file of its own is replicated; its variables go with every cycle
and each recovery point keeps the ones of its cycle; a test failover from a point and an
unplanned failover start with that point's variables in the VM's own NVRAM file.

The firmware runs (OVMF under TCG, no operating system: it writes its boot entries at
the first start); the variables are marked with `virt-fw-vars` (virt-firmware) while the
domain is off — SHIM_VERBOSE before the initial copy, FALLBACK_VERBOSE later — and read
back from the replica's files. Host names of their own (uefi-a, uefi-b), a random domain
name: the system libvirtd may be shared with another run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import lab
from harness.debian import must, virsh

pytestmark = pytest.mark.e2e

NAMES = ("uefi-a", "uefi-b")
CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def fw_vars(*args: str) -> str:
    tool = shutil.which("virt-fw-vars") or str(Path(sys.executable).parent / "virt-fw-vars")
    proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def variables(path: Path) -> set[str]:
    """The names of the variables in an edk2 variable store."""
    out = fw_vars("-i", str(path), "--print")
    return {line.split(":")[0].strip() for line in out.splitlines()
            if ":" in line and not line.startswith(("INFO", "WARNING"))}


def domain_xml(name: str, disk: Path, nvram: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{CODE}</loader>
    <nvram template='{TEMPLATE}'>{nvram}</nvram>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <memballoon model='none'/>
  </devices>
</domain>"""


@pytest.mark.timeout(900)
def test_uefi_variables_follow_every_cycle_and_every_point(request, fresh_dir):
    if not CODE.exists() or not TEMPLATE.exists():
        pytest.skip("OVMF is not installed (apt-get install ovmf)")
    request.getfixturevalue("libvirtd")
    name = f"ops-{secrets.token_hex(4)}"
    work = Path(tempfile.mkdtemp(prefix="vmr-uefi-", dir="/tmp"))
    os.chmod(work, 0o755)
    disk, nvram = work / "disk.qcow2", work / "VARS.fd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    fw_vars("-i", str(TEMPLATE), "-o", str(nvram), "--set-shim-verbose")
    a, b = lab.two_sites(fresh_dir, driver="libvirt", names=NAMES)
    replica_dom = f"vmr-{NAMES[1]}-{name}"
    try:
        (work / "d.xml").write_text(domain_xml(name, disk, nvram))
        must(virsh("define", str(work / "d.xml")))
        must(virsh("start", name))                       # OVMF writes its boot entries
        a.run("enable", name, "--replica", b.address)
        assert a.json("initial", name)["cycle"] == 0
        first = [p for p in a.json("points", name) if p["id"] != "latest"]
        assert first, a.json("points", name)

        # Off: a variable set by the operator's tooling; the next cycle carries it.
        must(virsh("destroy", name))
        fw_vars("-i", str(nvram), "-o", str(nvram), "--set-fallback-verbose")
        assert {"SHIM_VERBOSE", "FALLBACK_VERBOSE"} <= variables(nvram)
        a.run("sync", name)
        kept = list(b.home.rglob("nvram/*.fd"))
        assert any(k.read_bytes() == nvram.read_bytes() for k in kept), kept

        # A test copy from the first point has that point's variables, not the latest.
        test = b.json("failover", name, "--test", "--point", str(first[0]["id"]))
        test_vars = b.home / "vms" / test["test_vm"] / "VARS.fd"
        seen = variables(test_vars)
        assert "SHIM_VERBOSE" in seen and "FALLBACK_VERBOSE" not in seen, seen
        b.run("failover", name, "--stop-test")

        # Unplanned failover: the latest variables, in the VM's own NVRAM file.
        b.json("failover", name)
        xml = must(virsh("dumpxml", "--inactive", replica_dom))
        own = b.home / "vms" / name / "VARS.fd"
        assert f">{own}</nvram>" in xml, xml
        assert {"SHIM_VERBOSE", "FALLBACK_VERBOSE"} <= variables(own)
        assert must(virsh("domstate", replica_dom)).strip() == "running"
    finally:
        lab.teardown(a, b)
        virsh("destroy", name)
        virsh("undefine", name, "--checkpoints-metadata", "--nvram")
        shutil.rmtree(work, ignore_errors=True)
