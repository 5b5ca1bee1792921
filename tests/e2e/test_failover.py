"""The fire drill, with the demo guest (it writes record N to sector N every 100 ms):
recovery points and test failover, planned failover with zero loss, reverse replication
and failback moving only differences, unplanned failover with cancel and complete, the
stale old primary fenced, and removal leaving nothing behind. The steps run in order on
one pair of hosts (each step starts from where the previous one left the VM)."""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from harness import lab
from helpers import wait_until
from vmreplica.hypervisor.guest import read_demo_records

pytestmark = pytest.mark.e2e

VM = "drill"
DISK = 8 << 30


@pytest.fixture(scope="module")
def drill(lab_root, driver):
    a, b = lab.two_sites(lab_root / f"drill-{driver}", driver=driver)
    state: dict = {"a": a, "b": b}
    yield state
    lab.teardown(a, b)


def _records(host, vm=VM):
    return read_demo_records(host.vm(vm)["disks"][-1]["path"])


_wait = functools.partial(wait_until, timeout=90)


def _ok_prefix(rec, live=False):
    """Records 1..N with no gap; sector 0 at N or (a write in flight) one behind. A disk
    read while its guest writes is not one instant: sector 0 was read first, the records
    later, so they may be a few ahead."""
    ahead = rec["contiguous"] - (rec["top"] or 0)
    return rec["gap_at"] is None and (0 <= ahead <= 30 if live else ahead in (0, 1))


def step_points_and_test_failover(drill):
    a, b = drill["a"], drill["b"]
    a.run("vm", "create", VM, "--disk", "8G", "--disk", "64M", "--guest", "demo")
    a.run("vm", "start", VM)
    _wait("records", lambda: (_records(a)["top"] or 0) >= 3)
    a.run("enable", VM, "--replica", b.address, "--frequency", "30s", "--recovery-history", "3",
          "--point-interval", "2s", "--app-consistent-every", "2")
    a.run("initial", VM)
    samples = []
    for _ in range(4):
        time.sleep(2.1)
        samples.append((time.time(), _records(a)["top"]))
        a.run("sync", VM)
    pts = b.json("points", VM)
    assert [p["kind"] for p in pts][-1] == "latest"
    frozen = [p for p in pts if p["id"] != "latest"]
    assert len(frozen) == 3                             # retention keeps --recovery-history
    assert {p["kind"] for p in frozen} == {"crash", "app"}  # every 2nd one app-consistent
    assert a.json("points", VM) == pts                  # listed from the primary as well
    oldest = frozen[0]
    # Start a test failover from the oldest point: an overlay, whatever the disk size.
    info = b.json("failover", VM, "--test", "--point", str(oldest["id"]))
    assert info["seconds"] < 2.0 and info["test_vm"] == f"{VM}-test"
    point_rec = read_demo_records(b.vm(f"{VM}-test")["disks"][-1]["path"])
    # The point holds what the guest had written at the point's time (within one interval).
    before = max((r for t, r in samples if t <= oldest["time"]), default=0)
    assert _ok_prefix(point_rec) and point_rec["contiguous"] >= before - 2
    # Replication goes on meanwhile, and the test VM boots and continues the sequence.
    a.run("sync", VM)
    assert b.json("status", VM)[0]["state"] == "replicating"
    _wait("the test VM's own records",
          lambda: _records(b, f"{VM}-test")["contiguous"] > point_rec["contiguous"] + 5)
    assert _ok_prefix(_records(b, f"{VM}-test"), live=True)
    p = b.run("failover", VM, "--test", check=False)
    assert p.returncode == 2 and "already running" in p.stderr
    overlays = list((b.home / "storage" / VM).glob("*/test.qcow2"))
    assert len(overlays) == 2
    b.run("failover", VM, "--stop-test")
    assert all(v["name"] != f"{VM}-test" for v in b.json("vm", "list"))
    assert not any(o.exists() for o in overlays)
    assert not (b.home / "vms" / f"{VM}-test").exists()


def step_planned_failover_zero_loss(drill):
    a, b = drill["a"], drill["b"]
    p = a.run("failover", VM, "--prepare", check=False)
    assert p.returncode == 2 and "--shutdown" in p.stderr      # the VM runs: refused
    out = a.run("failover", VM, "--prepare", "--shutdown").stdout
    assert "prepared" in out and f"on {b.name}: vmreplica failover {VM}" in out
    assert a.vm(VM)["state"] == "stopped"
    last = _records(a)
    assert _ok_prefix(last) and last["top"] == last["contiguous"]
    p = a.run("vm", "start", VM, check=False)
    assert p.returncode == 2 and "prepared for a planned failover" in p.stderr
    out = b.run("failover", VM).stdout
    assert "planned failover" in out and f"next: vmreplica reverse {VM}" in out
    status = b.json("status", VM)[0]
    assert status["state"] == "failed_over" and status["next"] == f"vmreplica reverse {VM}"
    # Every record the guest wrote before shutdown is there; it continues with no gap.
    _wait("records after the failover", lambda: _records(b)["contiguous"] > last["top"] + 5)
    assert _ok_prefix(_records(b), live=True)
    drill["planned_last"] = last["top"]


def step_reverse_and_failback_move_only_differences(drill):
    a, b = drill["a"], drill["b"]
    info = b.json("reverse", VM)
    print(f"reverse moved {info['bytes_moved']} of {info['disk_bytes']} bytes")
    assert info["bytes_moved"] < 0.05 * DISK and info["disk_bytes"] >= DISK
    assert a.vm(VM)["role"] == "replica" and b.vm(VM)["role"] == "primary"
    p = a.run("vm", "start", VM, check=False)
    assert p.returncode == 2 and "replica" in p.stderr
    stats = b.json("sync", VM, "--verify")
    assert stats["verified"]
    # Failback: the same way back, planned, then reverse again.
    b.run("failover", VM, "--prepare", "--shutdown")
    last = _records(b)
    a.run("failover", VM)
    info = a.json("reverse", VM)
    print(f"failback reverse moved {info['bytes_moved']} of {info['disk_bytes']} bytes")
    assert info["bytes_moved"] < 0.05 * DISK
    assert a.vm(VM)["role"] == "primary" and b.vm(VM)["role"] == "replica"
    _wait("records after failback", lambda: _records(a)["contiguous"] > last["top"] + 5)
    assert _ok_prefix(_records(a), live=True)
    assert a.json("sync", VM, "--verify")["verified"]
    # The failed-back VM runs on plain disks of its own (its chain was merged into them,
    # issue 17 item 9); the points of the chain went with it.
    for d in a.vm(VM)["disks"]:
        assert d["path"] == str(a.home / "vms" / VM / f"{d['name']}.qcow2")
        assert len(_backing_chain(d["path"])) == 1, d   # merged by the failback's reverse
    assert not (a.home / "storage" / VM).exists()
    # Issue 17: one numbering after the failback: the replica's points, listed the same
    # on either host, no id twice (site-a listed its old replica layers as `1 site-a`).
    for host in (a, b):
        pts = host.json("points", VM)
        assert all(p["host"] == b.name for p in pts), pts
        assert len({p["id"] for p in pts}) == len(pts), pts


def _gone(pid: int) -> bool:
    """The process has exited (no /proc entry, or a zombie: an empty command line)."""
    try:
        return not Path(f"/proc/{pid}/cmdline").read_text()
    except FileNotFoundError:
        return True


def _backing_chain(path: str) -> list:
    import json
    import subprocess
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
                         capture_output=True, text=True).stdout
    return json.loads(out) if out.startswith("[") else [json.loads(out)]


def step_unplanned_failover_cancel_complete_and_stale_primary_fenced(drill):
    a, b = drill["a"], drill["b"]
    for _ in range(3):
        time.sleep(2.1)
        a.run("sync", VM)
    shipped = _records(b)                                # the replica's head
    disk = a.vm(VM)["disks"][-1]["path"]
    qemu_pid = a.vm(VM)["pid"]
    os.kill(a.daemon_pid(), signal.SIGKILL)              # site-a burns down
    os.kill(qemu_pid, signal.SIGKILL)
    _wait("site-a's QEMU gone", lambda: _gone(qemu_pid))
    on_a = read_demo_records(disk)
    out = b.run("failover", VM).stdout
    assert "unplanned failover" in out and "--complete" in out
    assert b.json("status", VM)[0]["state"] == "failover_in_progress"
    _wait("the failed-over guest's records",
          lambda: _records(b)["contiguous"] > shipped["contiguous"] + 3)
    rec = _records(b)
    assert _ok_prefix(rec, live=True)
    # At most one cycle of records is lost: what the last cycle had shipped is all there.
    assert rec["contiguous"] >= shipped["contiguous"] and on_a["top"] >= shipped["top"]
    b.run("failover", VM, "--cancel")                    # discard, try an older point
    assert b.vm(VM)["state"] == "stopped"
    older = [p for p in b.json("points", VM) if p["id"] != "latest"][0]
    b.run("failover", VM, "--point", str(older["id"]))
    out = b.run("failover", VM, "--complete").stdout
    assert "failed_over" in out
    assert b.json("points", VM) == []   # the chosen point is the VM's disk; the others went
    # site-a comes back with its VM set to run: it learns it is stale and is fenced.
    a.start()
    p = a.run("vm", "start", VM, check=False)
    assert p.returncode == 2 and "fenced" in p.stderr and b.name in p.stderr
    status = a.json("status", VM)[0]
    assert status["fenced"] and status["health"] == "critical"
    assert f"reverse {VM}" in status["next"]
    assert a.vm(VM)["state"] == "stopped"
    info = b.json("reverse", VM)
    print(f"reverse after unplanned failover moved {info['bytes_moved']} bytes")
    assert info["bytes_moved"] < 0.05 * DISK
    assert b.json("sync", VM, "--verify")["verified"]


def step_stale_primary_with_running_vm_is_powered_off(drill):
    """The old primary's QEMU survived (only its daemon died): when the daemon is back
    it asks the replica at once, learns of the takeover and powers its copy off."""
    a, b = drill["a"], drill["b"]      # site-b is the primary now, site-a its replica
    b.run("vm", "start", VM) if b.vm(VM)["state"] != "running" else None
    b_pid = b.vm(VM)["pid"]
    os.kill(b.daemon_pid(), signal.SIGKILL)              # site-b's daemon dies, QEMU runs on
    a.run("failover", VM)                                # unplanned, to the latest state
    a.run("failover", VM, "--complete")
    assert Path(f"/proc/{b_pid}").exists()               # two copies running now...
    b.start()
    _wait("site-b to fence its copy", lambda: not Path(f"/proc/{b_pid}").exists(), timeout=30)
    status = b.json("status", VM)[0]
    assert status["fenced"] and a.name in status["fenced"]
    a.json("reverse", VM)


def _rows(home: Path) -> dict:
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
    try:
        return {t: db.execute(f"SELECT count(*) FROM {t} WHERE vm=?", (VM,)).fetchone()[0]
                for t in ("relationships", "staged_cycles", "cycles", "recovery_points")}
    finally:
        db.close()


def step_remove_leaves_nothing_behind(drill):
    a, b = drill["a"], drill["b"]
    primary = a if a.vm(VM)["role"] == "primary" else b
    replica = b if primary is a else a
    primary.run("vm", "stop", VM, "--force")
    primary.run("remove", VM)
    assert all(v["name"] != VM for v in replica.json("vm", "list"))
    assert not (replica.home / "storage" / VM).exists() and not (replica.home / "vms" / VM).exists()
    assert not (primary.home / "storage" / VM).exists()     # no layer, overlay or folder
    assert not list((replica.home / "staging").glob(f"{VM}/*"))
    zero = {"relationships": 0, "staged_cycles": 0, "cycles": 0, "recovery_points": 0}
    assert _rows(a.home) == zero and _rows(b.home) == zero
    vm = primary.vm(VM)
    assert vm["role"] == "none" and all(Path(d["path"]).exists() for d in vm["disks"])
    assert all(len(_backing_chain(d["path"])) == 1 for d in vm["disks"])   # its own disks
    for d in vm["disks"]:
        import json
        import subprocess
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", d["path"]],
                                         capture_output=True, text=True).stdout)
        assert not info.get("format-specific", {}).get("data", {}).get("bitmaps")
    # (the storage daemon the sessions of powered-off VMs share belongs to the running
    # daemon, not to a VM: it stays until it has been idle a while; a dead daemon's goes)
    at_rest = f"atrest-{replica.daemon_pid()}."
    leftovers = [p for p in (replica.home / "run").iterdir()
                 if (p.suffix in (".qmp", ".nbd", ".qcow2") or p.name.endswith(".qsd.pid"))
                 and not p.name.startswith(at_rest)]
    assert leftovers == [], leftovers


STEPS = [
    step_points_and_test_failover,
    step_planned_failover_zero_loss,
    step_reverse_and_failback_move_only_differences,
    step_unplanned_failover_cancel_complete_and_stale_primary_fenced,
    step_stale_primary_with_running_vm_is_powered_off,
    step_remove_leaves_nothing_behind,
]


@pytest.mark.timeout(1800)
def test_steps_in_order(drill):
    """The steps are one operator's drill on one pair of hosts, in this order: each starts
    where the one before left the VM (so they are one test: a failing step stops the
    drill, and its name is in the traceback)."""
    for step in STEPS:
        print(f"-- {step.__name__}")
        step(drill)
