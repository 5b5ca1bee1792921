"""Continuous mode for an operator's existing libvirt domain (defined with `virsh define`,
its qcow2 disks overlays on base images of its own, as templates make them): the
write-blocking mirror runs (what the guest wrote is on the replica already), a planned
failover needs no final cycle and loses nothing, reverse makes the carried replica VM
the primary and mirrors into the domain's own disks — byte for byte, also where the
data is in their base images — and the failback brings the guest home to the domain, as
it was defined, with nothing lost; reverse again and it mirrors from home. A disk tracked
by hash scan (a raw file) is refused for continuous mode at enable, set and
--include-disk, with the way out in the hint.

The guest is the demo guest (it writes a numbered record every 100 ms on its last disk):
a record missing on the replica is a write lost. Host names of their own (exco-a,
exco-b) and random domain names: another run may share the system libvirtd.
"""

from __future__ import annotations

import functools
import secrets
import subprocess
from pathlib import Path

import pytest

from harness import lab
from harness.operator import checkpoints, demo_domain_xml, inactive_xml, undefine, virsh
from helpers import (
    assert_replica_equals,
    images_identical,
    qemu_io,
    recent_events,
    replica_row,
    wait_until,
)
from vmreplica.hypervisor.guest import read_demo_records

pytestmark = pytest.mark.e2e

NAMES = ("exco-a", "exco-b")


@pytest.fixture(scope="module")
def sites(lab_root, libvirtd):
    a, b = lab.two_sites(lab_root / "existing-continuous", driver="libvirt", names=NAMES)
    yield a, b
    lab.teardown(a, b)


def _create(path: Path, size: str, backing: Path | None = None) -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-F", "qcow2", "-b", str(backing)]
    subprocess.run(args + [str(path)] + ([size] if backing is None else []), check=True)
    return path


def _define(workdir: Path, name: str, disks, acpi: bool = False) -> None:
    xml = workdir / f"{name}.xml"
    xml.write_text(demo_domain_xml(name, disks, acpi=acpi))
    virsh("define", str(xml))


_wait = functools.partial(wait_until, timeout=90)


def _sync_state(host, vm) -> str | None:
    return host.json("status", vm)[0]["sync_state"]


def _in_sync(host, other, vm) -> None:
    _wait(f"{vm} in_sync on {host.name}", lambda: _sync_state(host, vm) == "in_sync",
          explain=lambda: recent_events(host, vm) + "\n" + recent_events(other, vm))


def _heads(host, vm) -> dict[str, str]:
    """The replica's chain heads (an existing domain's XML names its own disks, which
    are the base of the chains there, not the heads)."""
    return {d: c[-1] for d, c in replica_row(host.home, vm)["chains"].items()}


@pytest.mark.timeout(900)
def test_existing_domain_continuous_fails_over_and_comes_home(sites, workdir):
    a, b = sites
    name = f"ops-{secrets.token_hex(4)}"
    # vda: an overlay on a template; vdb (the guest's records, its last disk): an overlay
    # on a base holding data where the guest writes, so that the clusters the guest
    # writes first after each failover are in the base only.
    base, root = _create(workdir / "base.qcow2", "64M"), workdir / "root.qcow2"
    qemu_io(base, "write -P 0x5a 0 2M")
    _create(root, "", backing=base)
    dbase, data = _create(workdir / "data-base.qcow2", "32M"), workdir / "data.qcow2"
    qemu_io(dbase, "write -P 0x77 0 8M")
    _create(data, "", backing=dbase)
    try:
        _define(workdir, name, [("file", str(root), "qcow2", "vda"),
                                ("file", str(data), "qcow2", "vdb")], acpi=True)
        before = inactive_xml(name)
        a.run("vm", "start", name)
        _wait("the guest's records", lambda: (read_demo_records(data)["top"] or 0) >= 3)

        # Continuous from the start: seeded, then the mirror, in sync on both hosts.
        a.run("enable", name, "--replica", b.address, "--mode", "continuous",
              "--max-stall", "5")
        a.run("initial", name)
        _in_sync(a, b, name)
        replica_disk = b.vm(name)["disks"][-1]["path"]
        top = read_demo_records(data)["top"]
        _wait("the guest writing on", lambda: read_demo_records(data)["top"] > top + 30)
        # Every record the guest wrote is on the replica already (one may be in flight);
        # periodic cycles (30 s) would leave it seconds behind.
        on_a = read_demo_records(data)
        on_b = read_demo_records(replica_disk)
        assert on_b["gap_at"] is None and on_b["contiguous"] >= on_a["contiguous"] - 1, \
            (on_a, on_b)
        assert _sync_state(b, name) == "in_sync"           # the replica shows the same
        assert inactive_xml(name) == before                # (checkpoints aside)

        # Planned failover: the mirror had every write, no final cycle; zero loss.
        out = a.json("failover", name, "--prepare", "--shutdown")
        assert out["final_cycle"] is None, out
        assert_replica_equals(a, b, name)
        last = read_demo_records(data)["contiguous"]
        assert b.json("failover", name)["planned"] is True
        seen = read_demo_records(b.vm(name)["disks"][-1]["path"])   # (before it writes)
        assert seen["gap_at"] is None and seen["contiguous"] >= last, (last, seen)
        # (the failed-over VM writes on an overlay above the head)
        _wait("records on the replica host", lambda: read_demo_records(
            b.vm(name)["disks"][-1]["path"])["contiguous"] > last + 5)
        assert read_demo_records(b.vm(name)["disks"][-1]["path"])["gap_at"] is None

        # Reverse: the carried replica VM is the primary, mirroring into the domain's own
        # disks on exco-a (only the differences moved first).
        back = b.json("reverse", name)
        assert back["bytes_moved"] < back["disk_bytes"] // 4, back
        _in_sync(b, a, name)
        disk_b = b.vm(name)["disks"][-1]["path"]
        top = read_demo_records(disk_b)["top"]
        # 150 records: the guest crosses a 64 KiB cluster (128 records) it had not
        # written yet, whose data was only in the base image on exco-a.
        _wait("mirrored records", lambda: read_demo_records(disk_b)["top"] > top + 150)

        # Failback: again no final cycle; exco-a's chains hold exactly the guest's disks
        # (their base images included), then the domain runs at home as it was defined.
        out = b.json("failover", name, "--prepare", "--shutdown")
        assert out["final_cycle"] is None, out
        heads = _heads(a, name)
        for d in b.vm(name)["disks"]:
            same, msg = images_identical(d["path"], heads[d["name"]])
            assert same, f"{d['name']}: {msg}"
        last = read_demo_records(disk_b)["contiguous"]
        home = a.json("failover", name)
        assert home["planned"] is True and home["state"] == "failed_over", home
        seen = read_demo_records(data)               # (read before the guest writes there)
        assert seen["gap_at"] is None and seen["contiguous"] >= last, (last, seen)
        _wait("records at home", lambda: read_demo_records(data)["contiguous"] > last + 5)
        assert read_demo_records(data)["gap_at"] is None
        assert inactive_xml(name) == before

        # Reverse again: the domain is the primary, mirroring in sync.
        again = a.json("reverse", name)
        assert again["bytes_moved"] < again["disk_bytes"] // 4, again
        _in_sync(a, b, name)
        print(f"\n[existing continuous] reverse moved {back['bytes_moved']} B, failback "
              f"merged {home.get('merged_bytes')} B, reverse home moved "
              f"{again['bytes_moved']} B of {again['disk_bytes']} B")

        a.run("vm", "stop", name)
        a.run("remove", name)
        assert inactive_xml(name) == before
        assert checkpoints(name) == []
    finally:
        undefine(name)


def test_continuous_refused_for_a_disk_tracked_by_hash_scan(sites, workdir):
    a, b = sites
    name = f"ops-{secrets.token_hex(4)}"
    disk, raw = _create(workdir / "root.qcow2", "16M"), workdir / "data.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "16M"], check=True)
    try:
        _define(workdir, name, [("file", str(disk), "qcow2", "vda"),
                                ("file", str(raw), "raw", "vdb")])
        why = f"continuous mode cannot replicate disk vdb of {name}"

        r = a.run("enable", name, "--replica", b.address, "--mode", "continuous", check=False)
        assert r.returncode != 0 and why in r.stderr, r.stderr
        assert "hash scan" in r.stderr and "--exclude-disk vdb" in r.stderr, r.stderr
        assert "--mode periodic" in r.stderr and "qemu-img convert -O qcow2" in r.stderr
        assert all(x["vm"] != name for x in a.json("status") + b.json("status"))

        a.run("enable", name, "--replica", b.address)               # periodic: scanned
        r = a.run("set", name, "--mode", "continuous", check=False)
        assert r.returncode != 0 and why in r.stderr, r.stderr
        assert a.json("status", name)[0]["mode"] == "periodic"
        a.run("remove", name)

        # Its qcow2 disk alone can be mirrored; the raw one cannot join it.
        a.run("enable", name, "--replica", b.address, "--mode", "continuous",
              "--exclude-disk", "vdb")
        assert a.json("status", name)[0]["mode"] == "continuous"
        r = a.run("set", name, "--include-disk", "vdb", check=False)
        assert r.returncode != 0 and why in r.stderr, r.stderr
        assert a.vm(name)["disks"][1]["name"] == "vdb"
        assert [d["disk"] for d in a.json("status", name)[0]["tracking"]] == ["vda"]
        a.run("remove", name)
    finally:
        undefine(name)
