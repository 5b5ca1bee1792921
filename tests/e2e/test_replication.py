"""Replication of powered-off VMs end to end: enable, initial copy, delta cycles, operate.

Two real daemons, mutual TLS on loopback, qemu-storage-daemon on both sides; writes made
with qemu-io while the VM is off; after every cycle each replica head must equal the
primary's disk byte for byte (qemu-img compare).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from helpers import assert_replica_equals, qemu_io, wait_until

pytestmark = pytest.mark.e2e


def test_initial_then_delta_cycles_are_byte_exact(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "256M", "--disk", "64M")
    disks = [d["path"] for d in a.vm(vm_name)["disks"]]
    qemu_io(disks[0], "write -P 0x11 0 4M", "write -P 0x22 100M 1M")
    qemu_io(disks[1], "write -P 0x33 1M 64k")

    out = a.run("enable", vm_name, "--replica", b.address).stdout
    assert "ready_for_initial" in out and f"vmreplica initial {vm_name}" in out
    replica_vm = b.vm(vm_name)
    assert replica_vm["role"] == "replica" and replica_vm["state"] == "stopped"

    stats = a.json("initial", vm_name)
    # Only allocated data moves: 5 MiB + 64 KiB, not 320 MiB.
    assert stats["raw_bytes"] == 5 * 2**20 + 2**16
    assert_replica_equals(a, b, vm_name)

    for round_, cmds in enumerate([
        ["write -P 0x44 8M 64k", "write -P 0x45 200M 3M"],
        ["write -z 0 1M", "discard 100M 1M"],          # zeroes and a discard
        ["write -P 0x46 255M 1M", "write -P 0x47 0 512"],  # last MiB; a single sector
    ]):
        qemu_io(disks[0], *cmds)
        stats = a.json("sync", vm_name, "--verify")
        assert stats["cycle"] == round_ + 1 and stats["verified"]
        assert_replica_equals(a, b, vm_name)
    # A cycle with nothing changed is cheap and still acknowledged.
    stats = a.json("sync", vm_name)
    assert stats["raw_bytes"] == 0 and stats["zero_bytes"] == 0
    assert_replica_equals(a, b, vm_name)

    status = a.json("status", vm_name)[0]
    assert status["state"] == "replicating" and status["health"] == "normal"
    assert status["last_cycle_at"] and status["lag_seconds"] < 60
    rstatus = b.json("status", vm_name)[0]
    assert rstatus["role"] == "replica" and rstatus["state"] == "replicating"


def test_replica_vm_cannot_be_started(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "32M")
    a.run("enable", vm_name, "--replica", b.address)
    proc = b.run("vm", "start", vm_name, check=False)
    assert proc.returncode != 0
    assert "replica" in proc.stderr and "failover" in proc.stderr
    assert b.vm(vm_name)["state"] == "stopped"
    a.run("remove", vm_name)


def test_excluded_disk_is_not_replicated(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "32M", "--disk", "32M")
    a.run("enable", vm_name, "--replica", b.address, "--exclude-disk", "disk1")
    assert [d["name"] for d in b.vm(vm_name)["disks"]] == ["disk0"]
    disks = [d["path"] for d in a.vm(vm_name)["disks"]]
    qemu_io(disks[0], "write -P 1 0 64k")
    qemu_io(disks[1], "write -P 2 0 64k")
    stats = a.json("initial", vm_name)
    assert stats["raw_bytes"] == 65536
    assert_replica_equals(a, b, vm_name)
    a.run("remove", vm_name)


def test_suspend_keeps_tracking_and_resume_ships_it(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "64M")
    disk = a.vm(vm_name)["disks"][0]["path"]
    a.run("enable", vm_name, "--replica", b.address)
    a.run("initial", vm_name)
    assert "suspended" in a.run("suspend", vm_name).stdout
    proc = a.run("sync", vm_name, check=False)
    assert proc.returncode != 0 and "resume" in proc.stderr
    qemu_io(disk, "write -P 9 1M 128k")
    view = a.json("status", vm_name)[0]       # the operator's choice: a warning, with why
    assert view["health"] == "warning" and "suspended" in " ".join(view["reasons"]), view
    a.run("resume", vm_name)            # (the scheduler may run the catch-up cycle first)
    a.json("sync", vm_name)
    assert_replica_equals(a, b, vm_name)
    a.run("remove", vm_name)


def _rows(home: Path, vm: str) -> dict:
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
    try:
        return {t: db.execute(f"SELECT count(*) FROM {t} WHERE vm=?", (vm,)).fetchone()[0]
                for t in ("relationships", "staged_cycles", "cycles")}
    finally:
        db.close()


def _bitmaps(path: str) -> list[str]:
    import subprocess
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                                     capture_output=True, text=True, check=True).stdout)
    return [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]


def test_remove_leaves_nothing_behind(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "32M")
    disk = a.vm(vm_name)["disks"][0]["path"]
    a.run("enable", vm_name, "--replica", b.address)
    a.run("initial", vm_name)
    qemu_io(disk, "write -P 3 0 64k")
    a.run("sync", vm_name)
    heads = [d["path"] for d in b.vm(vm_name)["disks"]]
    assert _bitmaps(disk)
    a.run("remove", vm_name)
    # Primary: the VM stays, no bitmap, no row.
    assert a.vm(vm_name)["role"] == "none"
    assert _bitmaps(disk) == []
    assert _rows(a.home, vm_name) == {"relationships": 0, "staged_cycles": 0, "cycles": 0}
    # Replica: no VM, no storage, no staging, no row.
    assert b.run("vm", "show", vm_name, check=False).returncode != 0
    assert not any(Path(h).exists() for h in heads)
    assert not (b.home / "storage" / vm_name).exists()
    assert not (b.home / "staging" / vm_name).exists()
    assert _rows(b.home, vm_name) == {"relationships": 0, "staged_cycles": 0, "cycles": 0}
    # ... so the same VM can be enabled again at once (no stale replica objects).
    a.run("enable", vm_name, "--replica", b.address)
    a.run("initial", vm_name)
    assert_replica_equals(a, b, vm_name)
    a.run("remove", vm_name, "--keep-replica")
    kept = b.vm(vm_name)
    assert kept["role"] == "none" and all(Path(d["path"]).exists() for d in kept["disks"])
    b.run("vm", "delete", vm_name)


def _cached_bytes(path: str) -> int:
    """How much of ``path`` the page cache holds (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip() or 0)


def test_the_replica_heads_leave_the_page_cache(sites, vm_name):
    """What a cycle wrote into a head (and an initial copy's verification read) does not
    stay cached: later cycles' writes into a head with gigabytes of it cached ran 3-4
    times slower here (qemutools.img.drop_cached_pages)."""
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "128M")
    disk = a.vm(vm_name)["disks"][0]["path"]
    qemu_io(disk, "write -P 0x51 0 16M")
    a.run("enable", vm_name, "--replica", b.address)
    a.run("initial", vm_name)
    head = b.vm(vm_name)["disks"][0]["path"]
    # (dropped on a thread of their own once the cycle is flushed: soon, not at once)
    wait_until("the head out of the page cache", lambda: _cached_bytes(head) < 1 << 20,
               timeout=10)
    qemu_io(disk, "write -P 0x52 32M 16M")
    a.run("sync", vm_name, "--verify")
    wait_until("the head out of the page cache", lambda: _cached_bytes(head) < 1 << 20,
               timeout=10)
    assert_replica_equals(a, b, vm_name)
