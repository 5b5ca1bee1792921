"""The Debian guest (scripts/build-debian-guest.sh) under libvirt: it boots from its own
disk through a BIOS (machine pc: SeaBIOS -> gptmbr.bin -> extlinux -> Debian's cloud
kernel -> systemd; the same disk boots through OVMF and systemd-boot in
tests/e2e/test_existing_uefi.py) under TCG, its guest agent answers, its SQLite bank runs
(integrity ok, the total constant, the counter growing), fsfreeze works, and the bank
survives a power cut (`virsh destroy`) with its integrity and total intact and no
committed transfer lost.

The image is built once into guest/debian (the cache `make setup` will use); later runs
reuse it while the recipe is unchanged. The domain, its isolated network and its files
are this test's own (unique names) and are removed at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from harness.debian import (
    AGENT_TIMEOUT,
    BUILD_TIMEOUT,
    GUEST_CACHE,
    agent,
    assert_sound,
    bank_check,
    boot_firmware,
    build,
    console_tail,
    domain_xml,
    must,
    virsh,
    wait_bank_above,
    wait_for_agent,
)

pytestmark = pytest.mark.integration


@pytest.mark.timeout(BUILD_TIMEOUT + 900)
def test_debian_guest_boots_runs_the_bank_and_survives_a_power_cut(request):
    if os.geteuid() != 0:
        pytest.skip("building the Debian guest (mmdebstrap, loop devices) needs root")
    request.getfixturevalue("libvirtd")      # tests/conftest.py: starts libvirtd if needed

    t_build = time.monotonic()
    last = build()
    print(f"\n[debian-guest] build (or cache check): {time.monotonic() - t_build:.1f} s: "
          f"{last}")

    tag = secrets.token_hex(3)
    dom = f"vmr-debtest-{tag}"
    net = f"vmr-debtest-{tag}"
    bridge = f"vmrdb{tag}"                   # at most 15 characters
    work = Path(tempfile.mkdtemp(prefix="vmr-debtest-", dir="/tmp"))
    os.chmod(work, 0o755)                    # libvirt-qemu must reach the disk
    disk = work / "disk.qcow2"
    console = work / "console.log"
    net_made = dom_defined = False
    try:
        shutil.copyfile(GUEST_CACHE / "disk.qcow2", disk)
        (work / "net.xml").write_text(
            f"<network><name>{net}</name><bridge name='{bridge}'/></network>\n")
        must(virsh("net-create", str(work / "net.xml")))     # isolated: no forward, no IP
        net_made = True
        (work / "domain.xml").write_text(domain_xml(dom, disk, console, net))
        must(virsh("define", str(work / "domain.xml")))
        dom_defined = True

        must(virsh("start", dom))
        boot = wait_for_agent(dom, AGENT_TIMEOUT)
        print(f"[debian-guest] first boot to guest-ping: {boot:.1f} s")
        assert boot_firmware(dom) == {"firmware": "bios"}       # SeaBIOS, not UEFI

        # the bank runs: integrity ok, total constant, counter growing
        first = wait_bank_above(dom, 0)
        assert_sound(first)
        second = wait_bank_above(dom, first["counter"])
        assert_sound(second)
        print(f"[debian-guest] bank: {first} -> {second}")

        # fsfreeze / thaw
        frozen = agent(dom, "guest-fsfreeze-freeze", timeout=60)
        assert isinstance(frozen, int) and frozen >= 1, frozen
        assert agent(dom, "guest-fsfreeze-status") == "frozen"
        thawed = agent(dom, "guest-fsfreeze-thaw", timeout=60)
        assert thawed == frozen, (frozen, thawed)
        assert agent(dom, "guest-fsfreeze-status") == "thawed"
        before_cut = wait_bank_above(dom, second["counter"])   # writes resume after thaw
        assert_sound(before_cut)

        # power cut, then boot again
        must(virsh("destroy", dom))
        must(virsh("start", dom))
        boot = wait_for_agent(dom, AGENT_TIMEOUT)
        print(f"[debian-guest] boot after the power cut to guest-ping: {boot:.1f} s")
        after = bank_check(dom)
        assert_sound(after)
        assert after["counter"] >= before_cut["counter"], (before_cut, after)
        resumed = wait_bank_above(dom, after["counter"])        # the service is back
        assert_sound(resumed)
        print(f"[debian-guest] after the power cut: {before_cut} -> {after} -> {resumed}")
    except BaseException:
        print(f"[debian-guest] console of {dom}:\n{console_tail(console)}")
        raise
    finally:
        if dom_defined:
            virsh("destroy", dom)
            virsh("undefine", dom)
        if net_made:
            virsh("net-destroy", net)
            virsh("net-undefine", net)       # transient: gone already; harmless
        shutil.rmtree(work, ignore_errors=True)
