"""Start-up recovery of a replica after an unclean stop (issue 16, defects 4 and 6): each
VM is recovered on its own, so one bad head stops no other VM; a staged cycle whose file
went missing is never dropped in silence — the relationship needs a resync and says so,
and the primary's next cycle turns into one."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from helpers import assert_replica_equals, qemu_io, replica_row, seeded, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("qemu_driver_only")]


_row = replica_row


def _seeded(a, b, vm, size="128M"):
    return seeded(a, b, vm, size)


def _kill_with_staged_cycles(a, b, vms_disks, monkeypatch):
    """A delta of every VM acknowledged and not checkpointed, then the replica killed."""
    b.stop()
    monkeypatch.setenv("VMREPLICA_CHECKPOINT_DELAY", "600")   # hold the checkpoints back
    b.start()
    for i, (vm, disk) in enumerate(vms_disks):
        qemu_io(disk, f"write -P {0x21 + i} 1M 2M", f"write -P {0x41 + i} 64M 64K")
        a.run("sync", vm)
    b.json("status")        # (a view waits for the applies that follow the acks)
    for vm, _ in vms_disks:
        assert list((b.home / "staging" / vm).glob("cycle-*.stage")), vm
    os.kill(b.daemon_pid(), signal.SIGKILL)
    monkeypatch.delenv("VMREPLICA_CHECKPOINT_DELAY")


def _wait_free(head: str) -> None:
    wait_until("the head to be free of its killed server",
               lambda: subprocess.run(["qemu-img", "info", head],
                                      capture_output=True).returncode == 0, timeout=30)


def test_one_bad_head_at_start_up_stops_no_other_vm(own_sites, vm_name, monkeypatch):
    a, b = own_sites
    bad, good = f"{vm_name}-bad", f"{vm_name}-good"
    disks = [(bad, _seeded(a, b, bad)), (good, _seeded(a, b, good))]
    bad_head = b.vm(bad)["disks"][0]["path"]
    _kill_with_staged_cycles(a, b, disks, monkeypatch)
    _wait_free(bad_head)
    # The bad VM's head is beyond repair: its header no longer says qcow2.
    with open(bad_head, "r+b") as f:
        f.write(b"XXXX")
    b.start()                                   # the daemon starts regardless
    # The good VM was recovered and replicates on; a test failover of it works.
    assert b.json("status", good)[0]["state"] == "replicating"
    assert_replica_equals(a, b, good)
    b.run("failover", good, "--test", "--point", "latest")
    b.run("failover", good, "--stop-test")
    qemu_io(disks[1][1], "write -P 0x77 8M 64K")
    a.run("sync", good)
    assert_replica_equals(a, b, good)
    # The bad one is in error, with its reason, and nothing reads its head.
    view = b.json("status", bad)[0]
    assert view["state"] == "error" and view["health"] == "critical", view
    assert any("could not be applied" in r or "recovery failed" in r
               for r in view["reasons"]), view
    assert [e for e in b.json("events", bad) if e["kind"] == "recovery"
            and "failed" in e["message"]]
    p = b.run("failover", bad, "--test", "--point", "latest", check=False)
    assert p.returncode != 0, p.stdout
    assert _row(b.home, bad)["apply_pending"]["cycle"] >= 1


def test_a_missing_stage_file_needs_a_resync_and_gets_it(own_sites, vm_name, monkeypatch):
    a, b = own_sites
    disk = _seeded(a, b, vm_name)
    head = b.vm(vm_name)["disks"][0]["path"]
    _kill_with_staged_cycles(a, b, [(vm_name, disk)], monkeypatch)
    _wait_free(head)
    for stage in (b.home / "staging" / vm_name).glob("cycle-*.stage"):
        stage.unlink()                          # lost: an acknowledged cycle is gone
    # (and the cycle's head writes undone: the resync must not count on them)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -z 1M 2M", head], check=True,
                   capture_output=True)
    b.start()
    row = _row(b.home, vm_name)
    assert row["state"] == "resync_required", row
    assert "missing" in row["resync_reason"]
    assert [e for e in b.json("events", vm_name) if e["kind"] == "recovery"
            and "missing" in e["message"]]
    # The primary's next cycle is refused and becomes a resync, which ends equal.
    p = a.run("sync", vm_name, check=False)
    assert p.returncode != 0 and "resynchroni" in p.stdout + p.stderr, p.stdout + p.stderr
    wait_until("the resync", lambda: a.json("status", vm_name)[0]["state"] == "replicating"
               and b.json("status", vm_name)[0]["state"] == "replicating", timeout=120)
    assert_replica_equals(a, b, vm_name)
