"""Every way to seed: export to a folder and import it on the replica (no disk data over
the network), a copy the replica already holds (only differences move; another VM's
copy refused), and a scheduled initial copy."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from helpers import assert_replica_equals, qemu_io

pytestmark = pytest.mark.e2e


def _wait(fn, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_export_import_seed(sites, vm_name, fresh_dir):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "128M", "--disk", "32M")
    disks = [d["path"] for d in a.vm(vm_name)["disks"]]
    qemu_io(disks[0], "write -P 1 0 16M", "write -P 2 100M 1M")
    a.run("enable", vm_name, "--replica", b.address)
    seed = fresh_dir / "usb-stick"
    out = a.run("initial", vm_name, "--method", "export", "--path", str(seed)).stdout
    assert "exported" in out and "--import" in out
    assert (seed / "seed.vmrc").exists() and json.loads((seed / "seed.json").read_text())["vm"] == vm_name
    qemu_io(disks[1], "write -P 3 0 64k")                  # written after the export
    p = a.run("sync", vm_name, check=False)
    assert p.returncode == 2 and "import" in p.stderr       # waits for the import
    # A damaged seed is refused whole.
    bad = fresh_dir / "bad"
    shutil.copytree(seed, bad)
    blob = bytearray((bad / "seed.vmrc").read_bytes())
    blob[len(blob) // 2] ^= 1
    (bad / "seed.vmrc").write_bytes(bytes(blob))
    p = b.run("initial", vm_name, "--import", str(bad), check=False)
    assert p.returncode == 1 and "damaged" in p.stderr, p.stderr
    assert b.json("status", vm_name)[0]["state"] == "waiting_for_initial"
    b.run("initial", vm_name, "--import", str(seed))
    # The primary learns of the import; the first delta carries only what came after.
    _wait(lambda: a.json("status", vm_name)[0]["state"] == "replicating", "the import")
    stats = a.json("sync", vm_name)
    assert stats["raw_bytes"] + stats["zero_bytes"] <= 64 * 1024
    assert_replica_equals(a, b, vm_name)
    a.run("remove", vm_name)


def test_existing_copy_moves_only_differences(sites, vm_name, fresh_dir):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "128M")
    vm = a.vm(vm_name)
    disk = vm["disks"][0]["path"]
    qemu_io(disk, "write -P 5 0 32M")
    # A backup of the VM's folder restored on the replica host...
    restored = fresh_dir / "restored"
    shutil.copytree((a.home / "vms" / vm_name), restored)
    qemu_io(disk, "write -P 6 4M 256k")                     # ...then the VM moved on
    a.run("enable", vm_name, "--replica", b.address)
    info = a.json("initial", vm_name, "--method", "existing", "--path", str(restored))
    assert info["bytes_moved"] == 256 * 1024, info
    assert_replica_equals(a, b, vm_name)
    qemu_io(disk, "write -P 7 9M 64k")
    assert a.json("sync", vm_name)["raw_bytes"] == 65536
    assert_replica_equals(a, b, vm_name)
    a.run("remove", vm_name)


def test_existing_copy_of_another_vm_is_refused(sites, vm_name, fresh_dir):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "64M")
    a.run("vm", "create", f"{vm_name}-other", "--disk", "64M")
    other = fresh_dir / "other"
    shutil.copytree(a.home / "vms" / f"{vm_name}-other", other)
    a.run("enable", vm_name, "--replica", b.address)
    p = a.run("initial", vm_name, "--method", "existing", "--path", str(other), check=False)
    assert p.returncode == 1 and "not of" in p.stderr and "nothing was merged" in p.stderr
    assert b.json("status", vm_name)[0]["state"] == "waiting_for_initial"
    assert other.exists() and (other / "disk0.qcow2").exists()
    a.run("initial", vm_name)                                # the network still works
    assert_replica_equals(a, b, vm_name)
    a.run("remove", vm_name)


def test_scheduled_initial_copy(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "32M")
    qemu_io(a.vm(vm_name)["disks"][0]["path"], "write -P 8 0 1M")
    a.run("enable", vm_name, "--replica", b.address)
    out = a.run("initial", vm_name, "--at", "+2s").stdout
    assert "scheduled" in out
    assert a.json("status", vm_name)[0]["state"] == "ready_for_initial"
    _wait(lambda: a.json("status", vm_name)[0]["state"] == "replicating", "the scheduled copy")
    assert_replica_equals(a, b, vm_name)
    a.run("remove", vm_name)
