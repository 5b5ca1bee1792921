"""The real Debian guest (scripts/build-debian-guest.sh) in tests: building it (cached in
guest/debian), its domain XML as an operator writes it (BIOS or UEFI: the one disk boots
both ways), and what the tests ask it through the guest agent (libvirt's
qemu-agent-command): ping, guest-exec, the SQLite bank's check
(guest-src/debian/bank-check), the firmware and boot entry it booted through."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from harness import operator

if TYPE_CHECKING:
    from harness.lab import LabHost

REPO = Path(__file__).parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-debian-guest.sh"
GUEST_CACHE = REPO / "guest" / "debian"

BUILD_TIMEOUT = 1500        # a first build: ~1-2 min here, more on a loaded machine
AGENT_TIMEOUT = 150         # boot to guest-ping: 25-45 s under TCG here; a busy machine is slower
BANK_TOTAL = 10 * 1000      # 10 accounts of 1000 (guest-src/debian/vmr-bank)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")     # Debian's ovmf
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")     # the NVRAM template
# systemd-boot's variables (the Boot Loader Interface)
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


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


def boot_firmware(dom: str) -> dict:
    """How the running guest was booted: ``{"firmware": "uefi"|"bios", "entry": ...,
    "esp": ...}`` — under UEFI the loader entry systemd-boot started
    (LoaderEntrySelected) and the partition uuid of the ESP it was loaded from
    (LoaderDevicePartUUID), read from efivarfs (4 bytes of attributes, then UTF-16)."""
    script = ('[ -d /sys/firmware/efi ] || { echo bios; exit 0; }; echo uefi; '
              f'for v in LoaderEntrySelected LoaderDevicePartUUID; do '
              f'od -An -v -tx1 -w4096 /sys/firmware/efi/efivars/$v-{LOADER_GUID} || exit 1; '
              'done')
    code, out, err = guest_exec(dom, "/bin/sh", "-c", script)
    assert code == 0, f"reading the firmware's variables exited {code}: {out}{err}"
    lines = out.splitlines()
    if lines[0] == "bios":
        return {"firmware": "bios"}
    # (efivarfs cannot seek: the attributes are dropped here, not by tail -c)
    entry, esp = (bytes.fromhex(h)[4:].decode("utf-16-le").rstrip("\0") for h in lines[1:3])
    return {"firmware": lines[0], "entry": entry, "esp": esp.lower()}


def efi_variables(dom: str) -> set[str]:
    """The names (NAME-GUID) of the UEFI variables the running guest's kernel sees."""
    code, out, err = guest_exec(dom, "/bin/ls", "/sys/firmware/efi/efivars")
    assert code == 0, f"ls efivars exited {code}: {out}{err}"
    return set(out.split())


def addresses(dom: str, mac: str) -> set[str]:
    """ADDR/PREFIX of the guest's interface with ``mac`` (guest-network-get-interfaces)."""
    for i in agent(dom, "guest-network-get-interfaces"):
        if i.get("hardware-address", "").lower() == mac:
            return {f"{a['ip-address']}/{a['prefix']}" for a in i.get("ip-addresses", [])
                    if a.get("ip-address-type") == "ipv4"}
    raise AssertionError(f"{dom} has no interface with MAC {mac}")


def wait_reip(host: LabHost, vm: str, timeout: float) -> dict:
    """Polls the relationship's re-IP record on ``host`` until it is no longer waiting."""
    t0 = time.monotonic()
    rec = None
    while time.monotonic() - t0 < timeout:
        rec = host.json("status", vm)[0]["reip"]
        assert rec is not None
        if rec["state"] != "waiting":
            return rec
        time.sleep(1)
    raise AssertionError(f"the re-IP of {vm} still waits after {timeout} s: {rec}")


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


def domain_xml(name: str, disk: Path, console: Path, network: str | None, mac: str = "",
               nvram: Path | None = None) -> str:
    """The guest's domain as an operator writes it: one virtio disk, a NIC on libvirt
    network ``network`` (MAC ``mac``, else libvirt's; none without a network), the
    guest-agent channel, a file serial console; TCG (type qemu). BIOS (machine pc,
    SeaBIOS) by default; with ``nvram``, UEFI: machine q35, OVMF_CODE_4M.fd and that
    NVRAM file (made by libvirt from OVMF_VARS_4M.fd when it does not exist)."""
    mac_el = f"<mac address='{mac}'/>" if mac else ""
    nic = f"""
    <interface type='network'>{mac_el}
      <source network='{network}'/>
      <model type='virtio'/>
    </interface>""" if network else ""
    if nvram is None:
        os_el = "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
    else:
        os_el = f"""<os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>
    <nvram template='{OVMF_VARS}'>{nvram}</nvram>
    <boot dev='hd'/>
  </os>"""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  {os_el}
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
    </disk>{nic}
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


ROOT_TYPE = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")   # GPT: Linux filesystem
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")    # GPT: EFI system partition


def gpt_partitions(raw: Path) -> list[dict]:
    """The partitions of a raw disk image's GPT (512-byte sectors): number, type, uuid,
    first byte and size in bytes."""
    with open(raw, "rb") as f:
        f.seek(512)
        head = f.read(512)
        assert head[:8] == b"EFI PART", f"{raw}: no GPT header"
        table = int.from_bytes(head[72:80], "little")
        count = int.from_bytes(head[80:84], "little")
        size = int.from_bytes(head[84:88], "little")
        f.seek(table * 512)
        entries = f.read(count * size)
    parts = []
    for i in range(count):
        e = entries[i * size:(i + 1) * size]
        kind = uuid.UUID(bytes_le=e[0:16])
        if kind.int == 0:
            continue
        first, last = int.from_bytes(e[32:40], "little"), int.from_bytes(e[40:48], "little")
        parts.append({"number": i + 1, "type": kind, "uuid": uuid.UUID(bytes_le=e[16:32]),
                      "start": first * 512, "size": (last - first + 1) * 512})
    return parts


def fsck_root(image: Path, work: Path) -> subprocess.CompletedProcess:
    """``e2fsck -n -f`` of the guest's root filesystem (the GPT's Linux partition,
    partition 1) as ``image`` (a qcow2 chain, e.g. a recovery point's layer) holds it: the
    image read whole into a raw file under ``work``, the root partition attached read-only
    as a loop device."""
    raw = work / "fsck.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)],
                   check=True, capture_output=True)
    roots = [p for p in gpt_partitions(raw) if p["type"] == ROOT_TYPE]
    assert len(roots) == 1, f"{image}: not one root partition in {gpt_partitions(raw)}"
    start, size = roots[0]["start"], roots[0]["size"]
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
