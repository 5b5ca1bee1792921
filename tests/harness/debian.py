"""The real Debian guest (scripts/build-debian-guest.sh) in tests: building it (cached in
guest/debian), its domain XML as an operator writes it, and what the tests ask it through
the guest agent (libvirt's qemu-agent-command): ping, guest-exec, the SQLite bank's check
(guest-src/debian/bank-check)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

from harness import operator

REPO = Path(__file__).parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-debian-guest.sh"
GUEST_CACHE = REPO / "guest" / "debian"

BUILD_TIMEOUT = 1500        # a first build: ~1-2 min here, more on a loaded machine
AGENT_TIMEOUT = 150         # boot to guest-ping: 25-45 s under TCG here; a busy machine is slower
BANK_TOTAL = 10 * 1000      # 10 accounts of 1000 (guest-src/debian/vmr-bank)


def virsh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """virsh on the system libvirtd, its result as it is (``must`` checks it)."""
    return operator.virsh(*args, check=False, timeout=timeout)


def must(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{' '.join(proc.args)}: {proc.stderr.strip()}"
    return proc.stdout


def agent(dom: str, execute: str, arguments: dict | None = None, timeout: int = 10) -> dict:
    """One guest agent command through libvirt; its "return" (raises on an error)."""
    cmd: dict = {"execute": execute}
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
            check: dict = json.loads(out)
            last = check
            if check["counter"] is not None and check["counter"] > counter:
                return check
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


def domain_xml(name: str, disk: Path, console: Path, network: str, mac: str = "") -> str:
    """The guest's domain as an operator writes it: one virtio disk, a NIC on libvirt
    network ``network`` (MAC ``mac``, else libvirt's), the guest-agent channel, a file
    serial console; TCG (type qemu)."""
    mac_el = f"<mac address='{mac}'/>" if mac else ""
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
    <interface type='network'>{mac_el}
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




def build() -> str:
    """Build the guest into GUEST_CACHE (or check the cache); the script's last line."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), str(GUEST_CACHE)], capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, f"build-debian-guest.sh failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout.strip().splitlines()[-1]


def fsck_root(image: Path, work: Path) -> subprocess.CompletedProcess:
    """``e2fsck -n -f`` of the guest's root filesystem (partition 1) as ``image`` (a qcow2
    chain, e.g. a recovery point's layer) holds it: the image read whole into a raw file
    under ``work``, partition 1 (from the MBR) attached read-only as a loop device."""
    raw = work / "fsck.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)],
                   check=True, capture_output=True)
    with open(raw, "rb") as f:
        mbr = f.read(512)
    assert mbr[510:512] == b"\x55\xaa", f"{image}: no MBR partition table"
    start = int.from_bytes(mbr[454:458], "little") * 512     # partition 1: first LBA
    size = int.from_bytes(mbr[458:462], "little") * 512      # and its sectors
    # (an offset loop device: containers have no udev to make /dev/loopNp1)
    loop = subprocess.run(["losetup", "-r", "--show", "-f", "-o", str(start), "--sizelimit",
                           str(size), str(raw)], check=True, capture_output=True,
                          text=True).stdout.strip()
    try:
        return subprocess.run(["e2fsck", "-n", "-f", loop], capture_output=True,
                              text=True, timeout=300)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        raw.unlink(missing_ok=True)
