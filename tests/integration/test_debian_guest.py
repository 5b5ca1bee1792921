"""The Debian guest (scripts/build-debian-guest.sh) under libvirt: it boots from its own
disk (SeaBIOS -> extlinux -> Debian's cloud kernel -> systemd) under TCG, its guest agent
answers, its SQLite bank runs (integrity ok, the total constant, the counter growing),
fsfreeze works, and the bank survives a power cut (`virsh destroy`) with its integrity and
total intact and no committed transfer lost.

The image is built once into guest/debian (the cache `make setup` will use); later runs
reuse it while the recipe is unchanged. The domain, its isolated network and its files
are this test's own (unique names) and are removed at the end.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-debian-guest.sh"
GUEST_CACHE = REPO / "guest" / "debian"
URI = "qemu:///system"

BUILD_TIMEOUT = 1500        # a first build: ~1-2 min here, more on a loaded machine
AGENT_TIMEOUT = 150         # boot to guest-ping: 25-45 s under TCG here; a busy machine is slower
BANK_TOTAL = 10 * 1000      # 10 accounts of 1000 (guest-src/debian/vmr-bank)


def virsh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                          timeout=timeout)


def must(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{' '.join(proc.args)}: {proc.stderr.strip()}"
    return proc.stdout


def agent(dom: str, execute: str, arguments: dict | None = None, timeout: int = 10) -> dict:
    """One guest agent command through libvirt; its "return" (raises on an error)."""
    cmd = {"execute": execute}
    if arguments is not None:
        cmd["arguments"] = arguments
    proc = virsh("qemu-agent-command", dom, json.dumps(cmd), "--timeout", str(timeout),
                 timeout=timeout + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"{execute}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)["return"]


def wait_for_agent(dom: str, timeout: float) -> float:
    """Polls guest-ping until it answers; the seconds it took."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        try:
            agent(dom, "guest-ping", timeout=5)
            return time.monotonic() - t0
        except RuntimeError as e:
            last = str(e)
        time.sleep(1)
    raise AssertionError(f"the guest agent did not answer within {timeout} s ({last})")


def guest_exec(dom: str, path: str, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Runs a command in the guest (guest-exec); its exit code, stdout and stderr."""
    pid = agent(dom, "guest-exec", {"path": path, "arg": list(args),
                                    "capture-output": True})["pid"]
    t0 = time.monotonic()
    while True:
        st = agent(dom, "guest-exec-status", {"pid": pid})
        if st["exited"]:
            break
        assert time.monotonic() - t0 < timeout, f"{path} did not end within {timeout} s"
        time.sleep(0.2)
    out = base64.b64decode(st.get("out-data", "")).decode()
    err = base64.b64decode(st.get("err-data", "")).decode()
    return st.get("exitcode", -1), out, err


def bank_check(dom: str) -> dict:
    code, out, err = guest_exec(dom, "/usr/local/bin/bank-check")
    assert code == 0, f"bank-check exited {code}: {out}{err}"
    return json.loads(out)


def wait_bank_above(dom: str, counter: int, timeout: float = 90) -> dict:
    """Polls bank-check until the bank's counter is above `counter` (the workload runs)."""
    t0 = time.monotonic()
    last: object = None
    while time.monotonic() - t0 < timeout:
        code, out, err = guest_exec(dom, "/usr/local/bin/bank-check")
        if code == 0:
            last = json.loads(out)
            if last["counter"] is not None and last["counter"] > counter:
                return last
        else:
            last = f"exit {code}: {out}{err}"
        time.sleep(1)
    raise AssertionError(f"the bank's counter did not pass {counter} within {timeout} s "
                         f"(last bank-check: {last})")


def assert_sound(check: dict) -> None:
    assert check["integrity"] == "ok", check
    assert check["journal_mode"] == "wal", check
    assert check["accounts"] == 10, check
    assert check["total"] == BANK_TOTAL, check


def domain_xml(name: str, disk: Path, console: Path, network: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='{network}'/>
      <model type='virtio'/>
    </interface>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def console_tail(console: Path, lines: int = 40) -> str:
    try:
        text = console.read_text(errors="replace")
    except OSError as e:
        return f"(no console log: {e})"
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.timeout(BUILD_TIMEOUT + 900)
def test_debian_guest_boots_runs_the_bank_and_survives_a_power_cut(request):
    if os.geteuid() != 0:
        pytest.skip("building the Debian guest (mmdebstrap, loop devices) needs root")
    request.getfixturevalue("libvirtd")      # tests/conftest.py: starts libvirtd if needed

    t_build = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), str(GUEST_CACHE)], capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, f"build-debian-guest.sh failed:\n{proc.stdout}{proc.stderr}"
    print(f"\n[debian-guest] build (or cache check): {time.monotonic() - t_build:.1f} s: "
          f"{proc.stdout.strip().splitlines()[-1]}")

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
