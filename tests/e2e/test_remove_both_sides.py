"""`remove` ends a relationship on both hosts, whichever of them runs it (issue 16, defect 8).

Run on the replica, it tells the primary first, which ends its side as its own `remove`
does (no row, no tracking bitmap on its disks: invariant 6). With the primary down, the
replica removes its side anyway and keeps a tombstone; the primary, once back, is
refused as "removed" at its next cycle and ends its side by itself. `--keep-replica`
(on either side) keeps the replica's disks as a standalone copy with a vm.json, which
the next `enable` does not refuse and `initial --method existing` adopts (only the
differences move); a VM of that name that is not a kept replica of this VM is refused.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from helpers import assert_replica_equals, qemu_io, recent_events, wait_until

pytestmark = pytest.mark.e2e


def _rows(home: Path, vm: str) -> dict:
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
    try:
        return {t: db.execute(f"SELECT count(*) FROM {t} WHERE vm=?", (vm,)).fetchone()[0]
                for t in ("relationships", "staged_cycles", "cycles", "recovery_points")}
    finally:
        db.close()


_NONE = {"relationships": 0, "staged_cycles": 0, "cycles": 0, "recovery_points": 0}


def _tombstones(home: Path) -> dict:
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM settings WHERE key='removed_replicas'").fetchone()
        return json.loads(row[0]) if row else {}
    finally:
        db.close()


def _image(path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)


def _bitmaps(path) -> list[str]:
    return [b["name"] for b in
            _image(path).get("format-specific", {}).get("data", {}).get("bitmaps", [])]


def _replicated(a, b, vm: str, sizes=("64M",), frequency="5m") -> list[str]:
    a.run("vm", "create", vm, *[x for s in sizes for x in ("--disk", s)])
    disks = [d["path"] for d in a.vm(vm)["disks"]]
    qemu_io(disks[0], "write -P 1 0 8M")
    a.run("enable", vm, "--replica", b.address, "--frequency", frequency)
    a.run("initial", vm)
    qemu_io(disks[0], "write -P 2 16M 64k")
    a.run("sync", vm)
    assert_replica_equals(a, b, vm)
    assert all(_bitmaps(d) for d in disks)
    return disks


def _relationships(host) -> list[str]:
    return [r["vm"] for r in host.json("status")]


def _removed_by(host, vm: str, by: str) -> bool:
    return any(e["message"] == f"replication removed by its replica {by}"
               for e in host.json("events", vm))


def _primary_side_gone(a, vm: str, disks: list[str]) -> None:
    assert vm not in _relationships(a)
    assert a.vm(vm)["role"] == "none"
    assert all(_bitmaps(d) == [] for d in disks), [(_bitmaps(d), d) for d in disks]
    assert _rows(a.home, vm) == _NONE


def _replica_side_gone(b, vm: str, heads: list[str]) -> None:
    assert b.run("vm", "show", vm, check=False).returncode != 0
    assert not any(Path(h).exists() for h in heads)
    assert not (b.home / "storage" / vm).exists()
    assert not (b.home / "staging" / vm).exists()
    assert _rows(b.home, vm) == _NONE


def _enable_again(a, b, vm: str, disks: list[str]) -> None:
    a.run("enable", vm, "--replica", b.address)
    a.run("initial", vm)
    assert_replica_equals(a, b, vm)
    qemu_io(disks[0], "write -P 3 20M 64k")
    assert a.json("sync", vm)["raw_bytes"] == 65536
    assert_replica_equals(a, b, vm)
    assert a.json("status", vm)[0]["state"] == "replicating"


def test_remove_on_the_replica_ends_the_primary_side_too(own_sites, vm_name):
    a, b = own_sites
    disks = _replicated(a, b, vm_name)
    heads = [d["path"] for d in b.vm(vm_name)["disks"]]
    out = b.run("remove", vm_name).stdout
    # The primary ended its side before the replica did: no row, no bitmap, an event.
    _primary_side_gone(a, vm_name, disks)
    assert _removed_by(a, vm_name, b.name), recent_events(a, vm_name)
    assert f"{a.name} ended its side" in out, out
    _replica_side_gone(b, vm_name, heads)
    assert vm_name not in _tombstones(b.home)          # the primary was told: no tombstone
    _enable_again(a, b, vm_name, disks)
    a.run("remove", vm_name)


def test_remove_on_the_replica_while_the_primary_is_down(own_sites, vm_name):
    a, b = own_sites
    disks = _replicated(a, b, vm_name, frequency="30s")
    heads = [d["path"] for d in b.vm(vm_name)["disks"]]
    a.stop()
    wait_until("site-a's daemon to stop", lambda: a.run("host", check=False).returncode != 0)
    out = b.run("remove", vm_name).stdout                # no --force needed
    assert "could not be reached" in out, out
    _replica_side_gone(b, vm_name, heads)
    stone = _tombstones(b.home)[vm_name]
    assert stone["peer"] == a.name and stone["id"] and stone["at"]
    # The primary, back, is refused at its first cycle and ends its side by itself.
    a.start()
    wait_until("the primary to end its side", lambda: vm_name not in _relationships(a),
               timeout=90, explain=lambda: recent_events(a, vm_name))
    assert _removed_by(a, vm_name, b.name), recent_events(a, vm_name)
    _primary_side_gone(a, vm_name, disks)
    # ... and told the replica, which dropped its tombstone.
    wait_until("the tombstone to go", lambda: vm_name not in _tombstones(b.home), timeout=30)
    _enable_again(a, b, vm_name, disks)
    a.run("remove", vm_name)


def test_a_kept_replica_seeds_the_next_enable(own_sites, vm_name):
    a, b = own_sites
    disks = _replicated(a, b, vm_name, sizes=("128M", "32M"))
    qemu_io(disks[1], "write -P 4 0 4M")
    a.run("sync", vm_name)
    identity = json.loads((a.home / "vms" / vm_name / "vm.json").read_text())["uuid"]
    kept = b.home / "storage" / f"{vm_name}.kept"

    out = b.run("remove", vm_name, "--keep-replica").stdout     # on the replica
    assert str(kept) in out and "--method existing" in out, out
    _primary_side_gone(a, vm_name, disks)
    assert _removed_by(a, vm_name, b.name)
    meta = json.loads((kept / "vm.json").read_text())
    assert meta["uuid"] == identity and meta["name"] == vm_name and meta["primary"] == a.name
    assert sorted(d["name"] for d in meta["disks"]) == ["disk0", "disk1"]
    vm = b.vm(vm_name)                                  # the kept VM: no replica any more
    assert vm["role"] == "none"
    for d in vm["disks"]:                               # standalone images in the kept folder
        assert Path(d["path"]).parent == kept and "backing-filename" not in _image(d["path"])
    assert not (b.home / "storage" / vm_name).exists() and _rows(b.home, vm_name) == _NONE

    qemu_io(disks[0], "write -P 5 4M 256k")             # the primary moves on meanwhile
    a.run("enable", vm_name, "--replica", b.address)    # not refused: it is this VM's copy
    info = a.json("initial", vm_name, "--method", "existing", "--path", str(kept))
    assert info["bytes_moved"] == 256 * 1024, info      # 160 MiB of disks, 256 KiB moved
    assert_replica_equals(a, b, vm_name)
    qemu_io(disks[0], "write -P 6 9M 64k")
    assert a.json("sync", vm_name)["raw_bytes"] == 65536
    assert_replica_equals(a, b, vm_name)
    assert a.json("status", vm_name)[0]["state"] == "replicating"

    # Again from the primary's side: the adopted copy is kept in the same folder.
    out = a.run("remove", vm_name, "--keep-replica").stdout
    assert str(kept) in out, out
    _primary_side_gone(a, vm_name, disks)
    qemu_io(disks[1], "write -P 7 1M 128k")
    a.run("enable", vm_name, "--replica", b.address)
    info = a.json("initial", vm_name, "--method", "existing", "--path", str(kept))
    assert info["bytes_moved"] == 128 * 1024, info
    assert_replica_equals(a, b, vm_name)
    a.run("remove", vm_name)                             # nothing left, the kept copy either
    assert not kept.exists() and b.run("vm", "show", vm_name, check=False).returncode != 0
    assert not (b.home / "storage" / vm_name).exists() and _rows(b.home, vm_name) == _NONE


def test_a_vm_that_is_not_a_kept_replica_of_this_vm_is_refused(own_sites, vm_name):
    a, b = own_sites
    a.run("vm", "create", vm_name, "--disk", "32M")
    b.run("vm", "create", vm_name, "--disk", "32M")     # the operator's own VM of that name
    theirs = b.vm(vm_name)["disks"][0]["path"]
    p = a.run("enable", vm_name, "--replica", b.address, check=False)
    assert p.returncode == 2 and f"already has a VM named {vm_name}" in p.stderr, p.stderr
    assert b.vm(vm_name)["disks"][0]["path"] == theirs and Path(theirs).exists()
    assert vm_name not in _relationships(a) and vm_name not in _relationships(b)
    b.run("vm", "delete", vm_name)
    # A kept replica of another VM that had the same name (another identity): refused too.
    a.run("enable", vm_name, "--replica", b.address)
    a.run("initial", vm_name)
    b.run("remove", vm_name, "--keep-replica")
    kept = b.home / "storage" / f"{vm_name}.kept"
    a.run("vm", "delete", vm_name)
    a.run("vm", "create", vm_name, "--disk", "64M")      # a new VM, a new identity
    p = a.run("enable", vm_name, "--replica", b.address, check=False)
    assert p.returncode == 2 and f"already has a VM named {vm_name}" in p.stderr, p.stderr
    assert (kept / "vm.json").exists() and b.vm(vm_name)["role"] == "none"
    assert all(Path(d["path"]).exists() for d in b.vm(vm_name)["disks"])
    b.run("vm", "delete", vm_name)                       # the kept VM goes with its folder
    assert not kept.exists()
