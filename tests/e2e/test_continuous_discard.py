"""Continuous mode and discards (issue 16, defect 7): with the demo guest running and its
write-blocking mirror in sync, a discard leaves the replica equal to the primary, and a
TRIM that reaches the replica's export (the request the mirror sends for a discard) is
applied to the head: the head, which sits on a chain of live recovery points, reads
zeroes there, not the older data of the layer below (a silent divergence). Then a
verified cycle passes and, the VM stopped, the images are identical. (Both drivers.)

The demo guest runs no commands on request (its agent knows a fixed few), so the
guest's discard is made where virtio-blk makes it: on the device's own BlockBackend in
the VM's QEMU (HMP `qemu-io -d <device>`), the entry a guest TRIM takes."""

from __future__ import annotations

import functools
import json
import sqlite3
import subprocess

import pytest

from harness import lab
from helpers import assert_replica_equals, recent_events, wait_until
from vmreplica.hypervisor.guest import read_demo_records
from vmreplica.hypervisor.qemu import QemuDriver

pytestmark = pytest.mark.e2e

MiB = 1 << 20
GUEST_AT = 8 * MiB      # disk0 (the guest's record writer uses the last disk only)
TRIM_AT = 16 * MiB

_wait = functools.partial(wait_until, timeout=60)


@pytest.fixture(scope="module")
def pair(lab_root, driver):
    a, b = lab.two_sites(lab_root / f"cont-discard-{driver}", driver=driver)
    yield a, b
    lab.teardown(a, b)


def _qmp(host, vm, driver, command, arguments=None):
    """One QMP command to the VM's own QEMU (qemu driver: its monitor; libvirt: virsh)."""
    if driver == "qemu":
        with QemuDriver(host.home, {}).monitor(vm, timeout=30) as m:
            return m.execute(command, arguments)
    msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
    out = subprocess.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command",
                          f"vmr-{host.name}-{vm}", json.dumps(msg)],
                         capture_output=True, text=True, check=True).stdout
    reply = json.loads(out)
    assert "error" not in reply, reply
    return reply["return"]


def _device_io(host, vm, driver, path, command) -> str:
    """``qemu-io`` on the BlockBackend of the guest device whose disk is ``path``."""
    qdevs = [b["qdev"] for b in _qmp(host, vm, driver, "query-block")
             if b.get("qdev") and path in json.dumps(b.get("inserted", {}))]
    assert len(qdevs) == 1, (path, qdevs)
    out = _qmp(host, vm, driver, "human-monitor-command",
               {"command-line": f'qemu-io -d {qdevs[0]} "{command}"'})
    assert "error" not in out.lower() and "failed" not in out.lower(), out
    return out


def _hex16(text: str) -> bytes:
    """The 16 bytes of a `read -v OFFSET 16` dump."""
    line = next(ln for ln in text.splitlines() if ":  " in ln)
    return bytes.fromhex("".join(line.split(":  ", 1)[1].split()[:16]))


def _head_reads(path, offset) -> bytes:
    """What the replica's head reads, its backing chain included (the export writes
    through: its qcow2 metadata is on the disk)."""
    proc = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c",
                           f"read -v {offset} 16", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return _hex16(proc.stdout)


def _chain_depth(path, offset) -> int:
    """The layer (0: the head itself) that holds ``offset`` in the replica's chain."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    for ext in json.loads(out):
        if ext["start"] <= offset < ext["start"] + ext["length"]:
            return ext["depth"]
    raise AssertionError(f"{offset} not in the map of {path}")


def _mirror_of(a, vm) -> dict:
    """The primary's record of the mirror: the replica's export and the TLS credentials."""
    db = sqlite3.connect(f"file:{a.home / 'state.db'}?mode=ro", uri=True, timeout=30)
    try:
        data = json.loads(db.execute("SELECT data FROM relationships WHERE vm=?",
                                     (vm,)).fetchone()[0])
    finally:
        db.close()
    return {"target": data["mirror_target"], "creds": data["mirror_creds"]}


def _nbd(mirror: dict, export: str):
    import nbd
    h = nbd.NBD()
    h.set_export_name(export)
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(mirror["creds"])
    h.set_tls_verify_peer(True)
    h.connect_tcp(mirror["target"]["host"], str(mirror["target"]["port"]))
    return h


def _new_point(b, vm):
    """Wait until the replica makes its next live recovery point (the head is frozen
    under a new, empty one)."""
    newest = lambda: max(p["id"] for p in b.json("points", vm) if isinstance(p["id"], int))  # noqa: E731
    n = newest()
    _wait("a live recovery point", lambda: newest() > n,
          timeout=30, explain=lambda: recent_events(b, vm))


def test_discards_reach_the_replica_head(pair, driver):
    a, b = pair
    vm = "cont-discard"
    a.run("vm", "create", vm, "--disk", "64M", "--disk", "32M", "--guest", "demo")
    a.run("vm", "start", vm)
    _wait("records", lambda: (read_demo_records(a.vm(vm)["disks"][-1]["path"])["top"] or 0) >= 3)
    a.run("enable", vm, "--replica", b.address, "--mode", "continuous",
          "--point-interval", "3s")
    a.run("initial", vm)
    _wait("in_sync", lambda: a.json("status", vm)[0]["sync_state"] == "in_sync",
          explain=lambda: recent_events(a, vm) + "\n" + recent_events(b, vm))
    src = a.vm(vm)["disks"][0]["path"]
    head = lambda: b.vm(vm)["disks"][0]["path"]          # noqa: E731 — moves at each point

    # 1. The guest writes 1 MiB, a live point freezes it below the head, the guest
    #    discards it: whatever QEMU makes of the discard, the replica stays equal to the
    #    primary (checked by the verified cycle and the images at the end; QEMU 7.2's
    #    mirror filter drops a discard before the disk while a mirror runs: the data stays
    #    on both sides).
    _device_io(a, vm, driver, src, f"write -P 0x5a {GUEST_AT} {MiB}")
    _wait("the write on the replica", lambda: _head_reads(head(), GUEST_AT) == b"\x5a" * 16)
    _new_point(b, vm)
    assert _chain_depth(head(), GUEST_AT) > 0           # in a frozen layer now
    _device_io(a, vm, driver, src, f"discard {GUEST_AT} {MiB}")
    guest_view = _head_reads(head(), GUEST_AT)
    print(f"{driver}: after the guest's discard while mirrored the replica reads "
          f"{guest_view[:4].hex()}… (checked against the primary at the end)")

    # 2. A TRIM on the mirror's path (NBD, into the replica's export, as the mirror sends
    #    a discard): written data that a live point froze below the head must read as
    #    zeroes afterwards, as on the primary, which never had data there.
    mirror = _mirror_of(a, vm)
    h = _nbd(mirror, "disk0")
    try:
        assert h.can_trim(), "the replica's export does not advertise TRIM"
        h.pwrite(b"\xa5" * MiB, TRIM_AT)
        _new_point(b, vm)
        assert _chain_depth(head(), TRIM_AT) > 0
        h.trim(MiB, TRIM_AT)
        exported = h.pread(16, TRIM_AT)
    finally:
        h.shutdown()
    assert exported == bytes(16), (f"the replica's export reads {exported.hex()} after a "
                                   "TRIM: the data of the layer below shows through")

    # 3. The VM stopped (a verified cycle of a running VM under a mirror is refused by
    #    libvirt's checkpoint transaction, "block device is in use by block job: mirror"),
    #    a verified cycle (the replica's heads against the primary's disks) and the images
    #    are identical.
    a.run("vm", "stop", vm)
    stats = a.json("sync", vm, "--verify")
    assert stats["verified"], stats
    assert_replica_equals(a, b, vm)
    for off in (TRIM_AT, TRIM_AT + MiB - 16):   # (on the disk now: the export is closed)
        got = _head_reads(head(), off)
        assert got == bytes(16), f"the replica's head reads {got.hex()} at {off}"
    a.run("remove", vm)
