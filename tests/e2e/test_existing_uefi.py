"""UEFI variables travel with the replica (issue 19): an operator's UEFI domain — the real
Debian guest (scripts/build-debian-guest.sh) booting through OVMF and systemd-boot from
its own disk (a qcow2 overlay on a base image), with an NVRAM file of its own — is
replicated while its SQLite bank runs; its variables go with every cycle and each
recovery point keeps the ones of its cycle; a test failover from a point and an
unplanned failover start with that point's variables in the VM's own NVRAM file, and
after the unplanned failover the replica VM boots Debian through UEFI from its own disk
with those variables (its kernel sees them) and its bank passes its check.

The variables are marked with `virt-fw-vars` (virt-firmware) while the domain is off —
SHIM_VERBOSE before the first start, FALLBACK_VERBOSE and FB_NO_REBOOT after the power
cut (FB_NO_REBOOT is a runtime variable: the guest's kernel lists it in efivarfs) — and
read back from the replica's files. Machine q35, OVMF_CODE_4M.fd, NVRAM from
OVMF_VARS_4M.fd, TCG. Host names of their own (uefi-a, uefi-b), a random domain name: the
system libvirtd may be shared with another run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness import lab
from harness.debian import (
    AGENT_TIMEOUT,
    BUILD_TIMEOUT,
    ESP_TYPE,
    GUEST_CACHE,
    OVMF_CODE,
    OVMF_VARS,
    assert_sound,
    bank_check,
    boot_firmware,
    build,
    console_tail,
    domain_xml,
    efi_variables,
    gpt_partitions,
    must,
    virsh,
    wait_bank_above,
    wait_for_agent,
)

pytestmark = pytest.mark.e2e

NAMES = ("uefi-a", "uefi-b")
SHIM_GUID = "605dab50-e046-4300-abb6-3dd810dd8b23"     # shim's variables (virt-firmware)


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


def esp_uuid(image: Path, work: Path) -> str:
    """The partition uuid of the ESP in the GPT of a qcow2 image (its first 34 sectors)."""
    head = work / "gpt.raw"
    subprocess.run(["qemu-img", "dd", "-U", "-f", "qcow2", "-O", "raw", "bs=512", "count=34",
                    f"if={image}", f"of={head}"], check=True, capture_output=True)
    esps = [p for p in gpt_partitions(head) if p["type"] == ESP_TYPE]
    head.unlink()
    assert len(esps) == 1, f"{image}: not one ESP"
    return str(esps[0]["uuid"])


@pytest.mark.timeout(BUILD_TIMEOUT + 600)
def test_uefi_debian_guest_and_its_variables_follow_every_cycle_and_every_point(
        request, fresh_dir):
    if os.geteuid() != 0:
        pytest.skip("building the Debian guest needs root")
    if not OVMF_CODE.exists() or not OVMF_VARS.exists():
        pytest.skip("OVMF is not installed (apt-get install ovmf)")
    request.getfixturevalue("libvirtd")
    build()
    t_start = time.monotonic()
    name = f"ops-{secrets.token_hex(4)}"
    work = Path(tempfile.mkdtemp(prefix="vmr-uefi-", dir="/tmp"))
    os.chmod(work, 0o755)                    # libvirt-qemu must reach the disk
    base, disk = work / "base.qcow2", work / "root.qcow2"
    nvram, console = work / "VARS.fd", work / "console.log"
    shutil.copyfile(GUEST_CACHE / "disk.qcow2", base)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(disk)], check=True)
    esp = esp_uuid(base, work)
    fw_vars("-i", str(OVMF_VARS), "-o", str(nvram), "--set-shim-verbose")
    a, b = lab.two_sites(fresh_dir, driver="libvirt", names=NAMES)
    replica_dom = f"vmr-{NAMES[1]}-{name}"
    try:
        (work / "d.xml").write_text(domain_xml(name, disk, console, None, nvram=nvram))
        must(virsh("define", str(work / "d.xml")))
        must(virsh("start", name))               # OVMF writes its boot entries
        boot = wait_for_agent(name, AGENT_TIMEOUT)
        # Debian booted through UEFI: systemd-boot's entry, from the disk's own ESP.
        booted = boot_firmware(name)
        assert booted == {"firmware": "uefi", "entry": "debian.conf", "esp": esp}, booted
        first_check = wait_bank_above(name, 0)
        assert_sound(first_check)
        print(f"\n[uefi] OVMF boot to guest-ping {boot:.1f} s; bank {first_check['counter']}")

        a.run("enable", name, "--replica", b.address)
        assert a.json("initial", name)["cycle"] == 0
        first = [p for p in a.json("points", name) if p["id"] != "latest"]
        assert first, a.json("points", name)

        # A power cut after the bank committed more; off, variables set by the operator's
        # tooling; the next cycle carries them (and the disk as the cut left it).
        committed = wait_bank_above(name, first_check["counter"])["counter"]
        must(virsh("destroy", name))
        fw_vars("-i", str(nvram), "-o", str(nvram), "--set-fallback-verbose",
                "--set-fallback-no-reboot")
        assert {"SHIM_VERBOSE", "FALLBACK_VERBOSE", "FB_NO_REBOOT"} <= variables(nvram)
        a.run("sync", name)
        b.json("status", name)      # (a view waits for the apply that follows the ack)
        kept = list(b.home.rglob("nvram/*.fd"))
        assert any(k.read_bytes() == nvram.read_bytes() for k in kept), kept

        # A test copy from the first point has that point's variables, not the latest.
        test = b.json("failover", name, "--test", "--point", str(first[0]["id"]))
        test_vars = b.home / "vms" / test["test_vm"] / "VARS.fd"
        seen = variables(test_vars)
        assert "SHIM_VERBOSE" in seen and "FALLBACK_VERBOSE" not in seen, seen
        b.run("failover", name, "--stop-test")

        # Unplanned failover: the latest variables, in the VM's own NVRAM file.
        t_fo = time.monotonic()
        b.json("failover", name)
        xml = must(virsh("dumpxml", "--inactive", replica_dom))
        own = b.home / "vms" / name / "VARS.fd"
        assert f">{own}</nvram>" in xml, xml
        assert {"SHIM_VERBOSE", "FALLBACK_VERBOSE", "FB_NO_REBOOT"} <= variables(own)
        assert must(virsh("domstate", replica_dom)).strip() == "running"

        # The replica VM boots Debian through UEFI from its own disk, its firmware on
        # those variables (the runtime one reaches its kernel), and its bank is sound with
        # every transfer committed before the cut.
        boot = wait_for_agent(replica_dom, AGENT_TIMEOUT)
        booted = boot_firmware(replica_dom)
        assert booted == {"firmware": "uefi", "entry": "debian.conf", "esp": esp}, booted
        assert f"FB_NO_REBOOT-{SHIM_GUID}" in efi_variables(replica_dom)
        after = bank_check(replica_dom)
        assert_sound(after)
        assert after["counter"] >= committed, (committed, after)
        assert_sound(wait_bank_above(replica_dom, after["counter"]))     # the service runs
        print(f"[uefi] failover to guest-ping {time.monotonic() - t_fo:.1f} s (boot "
              f"{boot:.1f} s); bank {committed} committed -> {after['counter']} on "
              f"{NAMES[1]}; test body {time.monotonic() - t_start:.1f} s")
    except BaseException:
        print(f"[uefi] console of {name}:\n{console_tail(console)}")
        raise
    finally:
        lab.teardown(a, b)
        virsh("destroy", name)
        virsh("undefine", name, "--checkpoints-metadata", "--nvram")
        shutil.rmtree(work, ignore_errors=True)
