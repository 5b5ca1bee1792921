"""Bulk operations: 20 VMs enabled, seeded and synced by tag in one command each,
reported per VM; a failure in the middle is reported and makes the exit code non-zero."""

from __future__ import annotations

import pytest

from helpers import assert_replica_equals

pytestmark = pytest.mark.e2e


def test_bulk_over_twenty_vms_by_tag(sites, vm_name):
    a, b = sites
    names = [f"{vm_name}-{i:02d}" for i in range(20)]
    for n in names:
        a.run("vm", "create", n, "--disk", "16M")
    out = a.run("vm", "tag", *names, "--add", "web").stdout
    assert "20 of 20 VM(s) done" in out
    a.run("vm", "create", f"{vm_name}-db", "--disk", "16M")      # untagged: left alone
    out = a.run("enable", "--tag", "web", "--replica", b.address).stdout
    assert out.count("enabled") == 20 and "20 of 20 VM(s) done" in out
    assert a.run("initial", "--tag", "web").stdout.count("acknowledged") == 20
    assert "20 of 20" in a.run("sync", "--tag", "web").stdout
    for n in names[::7]:
        assert_replica_equals(a, b, n)
    st = {r["vm"]: r for r in a.json("status")}
    assert all(st[n]["state"] == "replicating" for n in names)
    assert f"{vm_name}-db" not in st
    # One VM in the batch fails (suspended): the others go on, the exit code says so.
    a.run("suspend", names[3])
    p = a.run("sync", "--tag", "web", check=False)
    assert p.returncode == 1 and f"{names[3]}: FAILED" in p.stderr
    assert "19 of 20 VM(s) done" in p.stdout and f"failed: {names[3]}" in p.stdout
    a.run("resume", "--tag", "web", check=False)
    out = a.run("remove", "--tag", "web").stdout
    assert "20 of 20" in out
    assert a.json("status") == [] or all(r["vm"] not in names for r in a.json("status"))
    a.run("vm", "delete", "--tag", "web")
