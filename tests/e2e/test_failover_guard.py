"""An unplanned failover asks the primary first (issue 16, defect 9): while the primary
answers and runs the VM, `failover VM` on the replica is refused, nothing changed, with
what would be lost and how to do it right; `--force` goes on and the event log names the
loss; a primary that does not answer is the disaster case: the failover goes on, and the
event says the primary could not be reached.

The VM has no guest OS: QEMU runs it (its firmware finds nothing to boot and waits),
which is all "the VM runs on the primary" needs."""

from __future__ import annotations

import functools
import os
import signal
import time

import pytest

from helpers import recent_events, wait_until

pytestmark = pytest.mark.e2e

_wait = functools.partial(wait_until, timeout=60)


def _replicated_running_vm(a, b, vm: str) -> None:
    a.run("vm", "create", vm, "--disk", "32M")
    a.run("enable", vm, "--replica", b.address, "--frequency", "5m")
    a.run("initial", vm)
    a.run("vm", "start", vm)
    assert a.vm(vm)["state"] == "running"
    a.run("sync", vm)
    assert b.json("status", vm)[0]["state"] == "replicating"


def _failover_events(host, vm: str) -> list[str]:
    return [e["message"] for e in host.json("events", vm) if e["kind"] == "failover"]


def test_refused_while_the_primary_runs_the_vm(own_sites, vm_name):
    a, b = own_sites
    _replicated_running_vm(a, b, vm_name)
    before_a, before_b = a.json("status", vm_name)[0], b.json("status", vm_name)[0]
    p = b.run("failover", vm_name, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    err = p.stderr
    assert f"{a.name} answers and {vm_name} runs there" in err, err
    assert "the latest state (frozen at" in err and "ago)" in err, err
    assert "would be discarded at `reverse`" in err, err
    assert f"vmreplica failover {vm_name} --prepare --shutdown" in err and "--force" in err, err
    # Nothing changed on either side.
    after_a, after_b = a.json("status", vm_name)[0], b.json("status", vm_name)[0]
    assert after_b["state"] == "replicating" and after_a["state"] == "replicating"
    assert (after_b["epoch"], after_a["epoch"]) == (before_b["epoch"], before_a["epoch"])
    assert b.vm(vm_name)["state"] == "stopped" and a.vm(vm_name)["state"] == "running"
    assert not list((b.home / "storage" / vm_name).glob("*/failover-*.qcow2"))
    assert _failover_events(b, vm_name) == [], recent_events(b, vm_name)
    # Replication goes on.
    assert a.json("sync", vm_name, "--verify")["verified"]
    # A test failover needs no check.
    b.run("failover", vm_name, "--test")
    b.run("failover", vm_name, "--stop-test")


def test_force_fails_over_and_the_event_names_the_loss(own_sites, vm_name):
    a, b = own_sites
    _replicated_running_vm(a, b, vm_name)
    out = b.run("failover", vm_name, "--force").stdout
    assert "unplanned failover" in out and "--complete" in out, out
    assert f"warning: {vm_name} still runs on {a.name}" in out, out
    assert "will be discarded at `reverse`" in out, out
    assert b.json("status", vm_name)[0]["state"] == "failover_in_progress"
    assert b.vm(vm_name)["state"] == "running"
    events = _failover_events(b, vm_name)
    forced = [m for m in events if m.startswith("unplanned failover forced")]
    assert forced, recent_events(b, vm_name)
    assert f"the primary {a.name} answered and {vm_name} ran there" in forced[0]
    assert "since the latest state (frozen at" in forced[0]
    assert "will be discarded at `reverse`" in forced[0]
    b.run("failover", vm_name, "--cancel")
    assert b.vm(vm_name)["state"] == "stopped"


def test_bulk_form_passes_force_through(driver, own_sites):
    if driver != "qemu":   # the guard's logic is the driver's in neither case: once is enough
        pytest.skip("driver-independent; run on the qemu driver")
    a, b = own_sites
    vms = ["guard-bulk-1", "guard-bulk-2"]
    for vm in vms:
        _replicated_running_vm(a, b, vm)
    p = b.run("failover", *vms, check=False)
    assert p.returncode == 1 and "0 of 2 VM(s) done" in p.stdout, (p.stdout, p.stderr)
    assert all(f"{vm}: FAILED: {a.name} answers" in p.stderr for vm in vms), p.stderr
    out = b.run("failover", "--all", "--force").stdout
    assert "2 of 2 VM(s) done" in out, out
    for vm in vms:
        assert b.json("status", vm)[0]["state"] == "failover_in_progress"
        assert any(m.startswith("unplanned failover forced") for m in _failover_events(b, vm))
        b.run("failover", vm, "--cancel")


def test_unreachable_primary_is_the_disaster_case(own_sites, vm_name):
    a, b = own_sites
    _replicated_running_vm(a, b, vm_name)
    a.stop()                                   # the daemon goes; its QEMU keeps running
    _wait("site-a's daemon to stop", lambda: a.run("host", check=False).returncode != 0)
    out = b.run("failover", vm_name).stdout
    assert "unplanned failover" in out, out
    assert f"the primary {a.name} could not be reached" in out, out
    assert b.json("status", vm_name)[0]["state"] == "failover_in_progress"
    events = _failover_events(b, vm_name)
    assert any(m.startswith(f"the primary {a.name} could not be reached") and
               "connection refused" in m and "failing over as in a disaster" in m
               for m in events), recent_events(b, vm_name)
    b.run("failover", vm_name, "--cancel")


def test_hung_primary_counts_as_gone_after_a_few_seconds(driver, own_sites, vm_name):
    if driver != "qemu":   # the guard's logic is the driver's in neither case: once is enough
        pytest.skip("driver-independent; run on the qemu driver")
    a, b = own_sites
    _replicated_running_vm(a, b, vm_name)
    pid = a.daemon_pid()
    os.kill(pid, signal.SIGSTOP)               # it accepts connections, answers nothing
    try:
        t0 = time.monotonic()
        out = b.run("failover", vm_name, timeout=60).stdout
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert f"the primary {a.name} could not be reached" in out and "timed out" in out, out
    assert 4 < took < 20, took
    assert b.json("status", vm_name)[0]["state"] == "failover_in_progress"
    assert any(m.startswith(f"the primary {a.name} could not be reached")
               for m in _failover_events(b, vm_name)), recent_events(b, vm_name)
    b.run("failover", vm_name, "--cancel")
