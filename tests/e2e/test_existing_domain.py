"""An operator's libvirt domain, defined with `virsh define` (any name, disks of its own
outside any vmreplica home, no vmreplica metadata), is listed, enabled by its libvirt
name, seeded and replicated — stopped (writes by qemu-io) and running (the demo guest
writes its records) — and removing replication leaves its XML exactly as it was; it
cannot be deleted through vmreplica; network disks, missing device nodes and block
devices without a size are refused at enable (raw files and block devices replicate:
test_existing_raw_block; continuous mode: test_existing_continuous).

The guest is the demo guest's kernel and initramfs (hypervisor.guest.guest_files): a
running domain that really writes to its disk, so the running half proves changes made
by a guest under libvirt's checkpoints reach the replica. Host names of their own
(exist-a, exist-b) and random domain names: another run may share the system libvirtd.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from harness import lab
from harness.operator import checkpoints, demo_domain_xml, inactive_xml, undefine, virsh
from helpers import assert_replica_equals, qemu_io, wait_until
from vmreplica.hypervisor.guest import read_demo_records

pytestmark = pytest.mark.e2e

NAMES = ("exist-a", "exist-b")


def bitmaps(path: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out).get("format-specific", {}).get("data", {})
    return [b["name"] for b in data.get("bitmaps", [])]


def define(workdir: Path, name: str, disks) -> None:
    xml = workdir / f"{name}.xml"
    xml.write_text(demo_domain_xml(name, disks))
    virsh("define", str(xml))


@pytest.fixture
def exist_sites(fresh_dir, libvirtd):
    a, b = lab.two_sites(fresh_dir, driver="libvirt", names=NAMES)
    yield a, b
    lab.teardown(a, b)


def _records(path) -> dict:
    return read_demo_records(path)


def test_existing_domain_is_replicated_and_left_as_it_was(exist_sites, workdir):
    a, b = exist_sites
    name = f"ops-{secrets.token_hex(4)}"
    base, top, data = workdir / "base.qcow2", workdir / "root.qcow2", workdir / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    qemu_io(base, "write -P 0x5a 0 2M", "write -P 0x5b 40M 1M")       # under the overlay
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(top)], check=True)
    qemu_io(top, "write -P 0x61 1M 64k")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "32M"], check=True)
    try:
        define(workdir, name, [("file", str(top), "qcow2", "vda"),
                               ("file", str(data), "qcow2", "vdb")])
        before = inactive_xml(name)

        # Listed by its libvirt name, marked as an existing domain; shown and described.
        listed = {v["name"]: v for v in a.json("vm", "list")}
        assert listed[name]["origin"] == "existing" and listed[name]["role"] == "none"
        assert name in a.run("vm", "list").stdout and "existing" in a.run("vm", "list").stdout
        vm = a.vm(name)
        assert [(d["name"], d["path"], d["format"], d["virtual_size"]) for d in vm["disks"]] \
            == [("vda", str(top), "qcow2", 64 << 20), ("vdb", str(data), "qcow2", 32 << 20)]

        # Enabled by its name; the replica VM lives on exist-b, the domain stays as it is.
        a.run("enable", name, "--replica", b.address)
        assert b.vm(name)["role"] == "replica" and b.vm(name)["origin"] == "vmreplica"
        stats = a.json("initial", name, "--verify")
        assert stats["verified"]
        assert_replica_equals(a, b, name)       # guest-visible content, backing chain too

        # Stopped: qemu-io writes, a delta cycle, verified.
        qemu_io(top, "write -P 0x62 8M 64k", "write -P 0x63 63M 64k")
        qemu_io(data, "write -P 0x71 0 128k")
        stats = a.json("sync", name, "--verify")
        assert stats["verified"] and stats["raw_bytes"] == 64 * 1024 * 2 + 128 * 1024
        assert_replica_equals(a, b, name)
        assert checkpoints(name)                 # tracking is libvirt checkpoints...
        assert inactive_xml(name) == before      # ...and nothing else in its XML

        # Running: the demo guest writes records on its last disk (vdb).
        a.run("vm", "start", name)
        try:
            wait_until("the guest's records", lambda: (_records(data)["top"] or 0) >= 3,
                       timeout=180, every=1)
            for _ in range(2):
                top_seen = _records(data)["top"] or 0
                wait_until("more records",
                           lambda t=top_seen: (_records(data)["top"] or 0) > t + 1,
                           timeout=120, every=1)
                stats = a.json("sync", name, "--verify")
                assert stats["verified"] and stats["raw_bytes"] > 0
        finally:
            a.run("vm", "stop", name, "--force")
        stats = a.json("sync", name, "--verify")     # the last writes, the domain off
        assert stats["verified"]
        assert_replica_equals(a, b, name)
        assert _records(data) == read_demo_records(b.vm(name)["disks"][1]["path"])

        status = a.json("status", name)[0]
        assert status["state"] == "replicating" and status["health"] == "normal"
        assert inactive_xml(name) == before

        # It cannot be deleted through vmreplica; nor while replicated.
        a.run("remove", name)
        gone = a.run("vm", "delete", name, check=False)
        assert gone.returncode != 0
        assert "existing libvirt domain" in gone.stderr and "never deletes" in gone.stderr
        assert "virsh undefine" in gone.stderr

        # Removed: the domain exists, its XML exactly as before, no checkpoint, no bitmap.
        assert inactive_xml(name) == before
        assert checkpoints(name) == []
        assert bitmaps(top) == [] and bitmaps(data) == [] and bitmaps(base) == []
        assert a.vm(name)["role"] == "none" and a.vm(name)["origin"] == "existing"
        assert all(r["vm"] != name for r in b.json("status"))
        # (exist-b's replica VM is gone: the name is the primary's domain there again,
        # which shares this libvirtd)
        assert b.vm(name)["origin"] == "existing"
        assert not (a.home / "vms" / name).exists()
    finally:
        undefine(name)
    assert virsh("domstate", name, check=False).returncode != 0


def _free_loop_device() -> str:
    """A loop device node with nothing attached: a block device whose size reads 0."""
    return subprocess.run(["losetup", "-f"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_existing_domain_bad_input(exist_sites, workdir):
    a, b = exist_sites
    name = f"ops-{secrets.token_hex(4)}"
    raw, data = workdir / "raw.img", workdir / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "16M"], check=True)
    empty = _free_loop_device()
    try:
        define(workdir, name, [("file", str(raw), "raw", "vda"),
                               ("block", "/dev/vmr-no-such-lv", "raw", "vdb"),
                               ("file", str(data), "qcow2", "vdc"),
                               ("network", "export", "raw", "vdd"),
                               ("block", empty, "raw", "vde")])
        before = inactive_xml(name)
        kinds = {d["name"]: (d["kind"], d["format"]) for d in a.vm(name)["disks"]}
        assert kinds == {"vda": ("file", "raw"), "vdb": ("block", "raw"),
                         "vdc": ("file", "qcow2"), "vdd": ("network", "raw"),
                         "vde": ("block", "raw")}

        # The raw file is taken (scan-tracked); a block device whose node is missing is not.
        r = a.run("enable", name, "--replica", b.address, check=False)
        assert r.returncode != 0
        assert f"disk vdb of {name} is a block device that is missing: no device node " \
               "/dev/vmr-no-such-lv" in r.stderr, r.stderr
        assert "--exclude-disk vdb" in r.stderr
        r = a.run("enable", name, "--replica", b.address, "--exclude-disk", "vdb", check=False)
        assert r.returncode != 0
        assert f"disk vdd of {name} is a network disk (nbd:export)" in r.stderr, r.stderr
        assert "--exclude-disk vdd" in r.stderr
        r = a.run("enable", name, "--replica", b.address, "--exclude-disk", "vdb",
                  "--exclude-disk", "vdd", check=False)
        assert r.returncode != 0
        assert f"disk vde of {name}: the size of block device {empty} cannot be read" \
            in r.stderr, r.stderr
        assert a.json("status") == [] and b.json("status") == []    # nothing stored
        assert inactive_xml(name) == before

        r = a.run("vm", "delete", name, check=False)
        assert r.returncode != 0 and "never deletes or undefines it" in r.stderr, r.stderr
        assert inactive_xml(name) == before

        r = a.run("vm", "create", name, "--disk", "1M", check=False)     # its name is taken
        assert r.returncode != 0 and f"a VM named {name} exists" in r.stderr, r.stderr

        unknown = f"ops-{secrets.token_hex(4)}"
        r = a.run("enable", unknown, "--replica", b.address, check=False)
        assert r.returncode != 0 and f"no VM named {unknown}" in r.stderr, r.stderr
        assert "vmreplica vm list" in r.stderr
    finally:
        undefine(name)
