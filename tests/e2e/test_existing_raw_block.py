"""Issue 19, raw files and block devices of an operator's existing libvirt domain: a domain
defined with `virsh define` with a qcow2 disk (libvirt checkpoints), a raw image file and
a block device (a loop device: what an LVM logical volume is to QEMU) is listed, enabled,
seeded, changed while stopped (qemu-io on the raw file and on the device node) and while
running (the demo guest writes its records on its last disk, the block device), and
replicated byte-exact. The raw and block disks hold no bitmap: each cycle compares them
block by block with the replica's hash index and ships only the blocks that differ
(bytes moved bounded by what changed, never the disk), while the qcow2 disk keeps its
checkpoint tracking; status and measure say which tracking each disk uses and what the
last scan read and moved. The domain's XML never changes, and after `remove` it is
exactly as before, with no checkpoint left.

Host names of their own (rawblk-a, rawblk-b) and random domain names: another run may
share the system libvirtd. Loop devices are detached in a finally.
"""

from __future__ import annotations

import secrets
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from harness import lab
from harness.operator import checkpoints, demo_domain_xml, inactive_xml, undefine, virsh
from helpers import images_identical, qemu_io, wait_until
from vmreplica.hypervisor.guest import read_demo_records

pytestmark = pytest.mark.e2e

NAMES = ("rawblk-a", "rawblk-b")
K64 = 64 << 10
MiB = 1 << 20


def raw_io(path, *commands: str) -> None:
    """qemu-io on a raw image file or a block device (the domain is off)."""
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run(args + [str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


@pytest.fixture
def loop_device(workdir):
    """A 64 MiB loop device over a file of the work folder; detached afterwards."""
    backing = workdir / "lv.img"
    subprocess.run(["truncate", "-s", "64M", str(backing)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.fixture
def sites(fresh_dir, libvirtd):
    a, b = lab.two_sites(fresh_dir, driver="libvirt", names=NAMES)
    yield a, b
    lab.teardown(a, b)


def replica_heads(b, name: str) -> dict[str, str]:
    return {d["name"]: d["path"] for d in b.vm(name)["disks"]}


def assert_equal(paths: dict[str, str], b, name: str) -> None:
    heads = replica_heads(b, name)
    assert sorted(heads) == sorted(paths)
    for disk, src in paths.items():
        same, msg = images_identical(src, heads[disk])
        assert same, f"{disk}: {src} != {heads[disk]}: {msg}"


def checkpointed_disks(name: str, checkpoint: str) -> dict[str, str]:
    root = ET.fromstring(virsh("checkpoint-dumpxml", name, checkpoint, "--no-domain").stdout)
    return {d.get("name"): d.get("checkpoint") for d in root.findall("disks/disk")}


def test_raw_file_and_block_device_replicate_byte_exact_beside_a_qcow2_disk(
        sites, workdir, loop_device):
    a, b = sites
    name = f"ops-{secrets.token_hex(4)}"
    data, raw = workdir / "data.qcow2", workdir / "raw.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "32M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "48M"], check=True)
    qemu_io(data, "write -P 0x11 0 1M")
    raw_io(raw, "write -P 0x21 0 2M", "write -P 0x22 40M 512k")
    raw_io(loop_device, "write -P 0x31 1M 3M", "write -P 0x32 60M 64k")
    paths = {"vda": str(data), "vdb": str(raw), "vdc": loop_device}
    try:
        (workdir / f"{name}.xml").write_text(demo_domain_xml(name, [
            ("file", str(data), "qcow2", "vda"), ("file", str(raw), "raw", "vdb"),
            ("block", loop_device, "raw", "vdc")]))           # the guest writes on vdc
        virsh("define", str(workdir / f"{name}.xml"))
        before = inactive_xml(name)

        listed = {v["name"]: v for v in a.json("vm", "list")}
        assert listed[name]["origin"] == "existing"
        disks = {d["name"]: (d["kind"], d["format"], d["virtual_size"], d["path"])
                 for d in a.vm(name)["disks"]}
        assert disks == {"vda": ("file", "qcow2", 32 * MiB, str(data)),
                         "vdb": ("file", "raw", 48 * MiB, str(raw)),
                         "vdc": ("block", "raw", 64 * MiB, loop_device)}   # the device's size

        a.run("enable", name, "--replica", b.address)
        tracking = {t["disk"]: t["tracking"] for t in a.json("status", name)[0]["tracking"]}
        assert tracking == {"vda": "checkpoint", "vdb": "scan", "vdc": "scan"}
        stats = a.json("initial", name, "--verify")
        assert stats["verified"]
        assert_equal(paths, b, name)
        assert inactive_xml(name) == before

        # Stopped: qemu-io on each disk (the raw file, the device node, the qcow2 image).
        qemu_io(data, "write -P 0x12 8M 64k")
        raw_io(raw, "write -P 0x23 4M 64k", "write -P 0x24 20M 64k")
        raw_io(loop_device, "write -P 0x33 1M 128k")
        t0 = time.monotonic()
        stats = a.json("sync", name, "--verify")
        took = time.monotonic() - t0
        assert stats["verified"]
        # Bounded by what changed: 64 KiB + 2 x 64 KiB + 128 KiB, not the 144 MiB of disks.
        assert stats["raw_bytes"] + stats["zero_bytes"] == 5 * K64, stats
        scanned = stats["scanned"]
        assert set(scanned) == {"vdb", "vdc"}
        assert scanned["vdb"]["moved"] == 2 * K64 and scanned["vdc"]["moved"] == 2 * K64
        assert scanned["vdb"]["compared"] == 48 * MiB and scanned["vdc"]["compared"] == 64 * MiB
        # The raw file's holes are not read (its data: 2.5 MiB + 128 KiB); the device
        # answers no holes: read whole.
        assert scanned["vdb"]["read"] < 8 * MiB and scanned["vdc"]["read"] == 64 * MiB
        print(f"\n[stopped delta] moved {stats['raw_bytes'] + stats['zero_bytes']} B, "
              f"{stats['wire_bytes']} B on the wire, cycle {stats['seconds']} s "
              f"(sync --verify {took:.2f} s); scan read {scanned}")
        assert_equal(paths, b, name)
        cps = checkpoints(name)
        assert len(cps) == 1                                   # only for the qcow2 disk
        assert checkpointed_disks(name, cps[0]) == {"vda": "bitmap", "vdb": "no", "vdc": "no"}
        assert inactive_xml(name) == before

        # An unchanged domain: the scans read the disks, nothing moves.
        stats = a.json("sync", name)
        assert stats["raw_bytes"] + stats["zero_bytes"] == 0
        print(f"[idle delta] cycle {stats['seconds']} s; scan read "
              f"{ {d: c['read'] for d, c in stats['scanned'].items()} }")

        # Running: the demo guest writes its records on vdc, the block device; the
        # frozen view comes from libvirt's pull backup (full for the scanned disks).
        a.run("vm", "start", name)
        try:
            wait_until("the guest's records",
                       lambda: (read_demo_records(loop_device)["top"] or 0) >= 3,
                       timeout=180, every=1)
            for _ in range(2):
                seen = read_demo_records(loop_device)["top"] or 0
                wait_until("more records",
                           lambda t=seen: (read_demo_records(loop_device)["top"] or 0) > t + 1,
                           timeout=120, every=1)
                stats = a.json("sync", name, "--verify")
                moved = stats["raw_bytes"] + stats["zero_bytes"]
                assert stats["verified"] and 0 < moved <= 4 * MiB, stats
                assert stats["scanned"]["vdc"]["moved"] > 0
                assert stats["scanned"]["vdc"]["compared"] == 64 * MiB
                print(f"[running delta] moved {moved} B, cycle {stats['seconds']} s, "
                      f"scan {stats['scanned']}")
        finally:
            a.run("vm", "stop", name, "--force")
        stats = a.json("sync", name, "--verify")        # the last writes, the domain off
        assert stats["verified"]
        assert_equal(paths, b, name)
        records = read_demo_records(loop_device)
        assert records["top"] and records["top"] >= 5 and records["gap_at"] is None
        assert records == read_demo_records(replica_heads(b, name)["vdc"])

        # status and measure: the tracking of each disk, what the last scan read and moved.
        status = a.json("status", name)[0]
        assert status["state"] == "replicating" and status["health"] == "normal"
        lines = {t["disk"]: t for t in status["tracking"]}
        assert lines["vda"]["tracking"] == "checkpoint" and lines["vda"]["last_scan"] is None
        assert lines["vdc"]["tracking"] == "scan"
        assert lines["vdc"]["last_scan"]["read"] == 64 * MiB
        assert lines["vdc"]["last_scan"]["moved"] == stats["scanned"]["vdc"]["moved"]
        text = a.run("status", name).stdout
        assert f"{name}: tracking: vda: checkpoint; vdb: scan (last cycle read " in text, text
        assert "vdc: scan (last cycle read 64.0 MiB, moved " in text, text
        measured = a.json("measure", name)
        assert [t["tracking"] for t in measured["tracking"]] == ["checkpoint", "scan", "scan"]
        assert "tracking" in a.run("measure", name).stdout
        assert inactive_xml(name) == before

        a.run("remove", name)
        assert inactive_xml(name) == before
        assert checkpoints(name) == []
        assert a.vm(name)["role"] == "none" and a.vm(name)["origin"] == "existing"
        assert all(r["vm"] != name for r in b.json("status"))
        assert not (a.home / "vms" / name).exists()
    finally:
        undefine(name)
    assert virsh("domstate", name, check=False).returncode != 0


def test_an_all_raw_domain_has_no_checkpoint_at_all(sites, workdir, loop_device):
    """Every disk scan-tracked: no checkpoint is ever made, the XML never changes, and a
    delta moves the changed blocks only."""
    a, b = sites
    name = f"ops-{secrets.token_hex(4)}"
    raw = workdir / "only.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "16M"], check=True)
    raw_io(raw, "write -P 0x41 0 1M")
    try:
        (workdir / f"{name}.xml").write_text(demo_domain_xml(name, [
            ("file", str(raw), "raw", "vda"), ("block", loop_device, "raw", "vdb")]))
        virsh("define", str(workdir / f"{name}.xml"))
        before = inactive_xml(name)
        a.run("enable", name, "--replica", b.address)
        assert a.json("initial", name, "--verify")["verified"]
        raw_io(raw, "write -P 0x42 12M 64k")
        raw_io(loop_device, "write -P 0x43 30M 64k")
        stats = a.json("sync", name, "--verify")
        assert stats["verified"] and stats["raw_bytes"] == 2 * K64, stats
        assert_equal({"vda": str(raw), "vdb": loop_device}, b, name)
        assert checkpoints(name) == [] and inactive_xml(name) == before
        a.run("remove", name)
        assert checkpoints(name) == [] and inactive_xml(name) == before
    finally:
        undefine(name)
