"""The demo guest runs (TCG) while it is replicated: cycles of a running VM go through a
QMP transaction and fleecing; what reaches the replica is always a consistent prefix of
the guest's records; scheduled cycles run by themselves; after a clean shutdown and a
last cycle the replica is identical."""

from __future__ import annotations

import functools

import pytest

from helpers import assert_replica_equals, wait_until
from vmreplica.hypervisor.guest import read_demo_records

pytestmark = pytest.mark.e2e


def _records(host, vm):
    return read_demo_records(host.vm(vm)["disks"][-1]["path"])


_wait = functools.partial(wait_until, timeout=120)


def test_running_demo_guest_is_replicated(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "64M", "--disk", "32M", "--guest", "demo")
    a.run("vm", "start", vm_name)
    _wait("records", lambda: (_records(a, vm_name)["top"] or 0) >= 5)
    a.run("enable", vm_name, "--replica", b.address, "--frequency", "30s")
    stats = a.json("initial", vm_name, "--verify")
    assert stats["verified"]
    seen = []
    for _ in range(3):
        top = _records(a, vm_name)["top"] or 0       # the guest writes more before each
        _wait("the guest's next records",
              lambda top=top: (_records(a, vm_name)["top"] or 0) > top + 2)
        stats = a.json("sync", vm_name, "--verify")   # head == frozen point, byte for byte
        assert stats["verified"] and stats["raw_bytes"] > 0
        rec = _records(b, vm_name)
        # A consistent prefix: records 1..N, no gap, sector 0 at N or one behind (the
        # guest writes sector N, then sector 0).
        assert rec["gap_at"] is None and rec["contiguous"] - rec["top"] in (0, 1), rec
        seen.append(rec["contiguous"])
    assert seen[0] < seen[1] < seen[2]
    assert _records(a, vm_name)["contiguous"] >= seen[-1]

    # The scheduler runs a cycle by itself every 30 s.
    last = a.json("status", vm_name)[0]["cycle"]
    _wait("a scheduled cycle", lambda: a.json("status", vm_name)[0]["cycle"] > last, timeout=45)

    # Clean shutdown through the guest agent, then the last cycle: identical.
    a.run("vm", "stop", vm_name)
    a.run("sync", vm_name)
    assert_replica_equals(a, b, vm_name)
    on_a, on_b = _records(a, vm_name), _records(b, vm_name)
    assert on_a == on_b and on_b["top"] == on_b["contiguous"] > seen[-1]

    # Restarted, the guest continues its sequence; changes keep being tracked.
    a.run("vm", "start", vm_name)
    _wait("new records", lambda: _records(a, vm_name)["top"] > on_a["top"] + 5)
    a.run("sync", vm_name, "--verify")
    rec = _records(b, vm_name)
    assert rec["gap_at"] is None and rec["contiguous"] > on_a["top"]
    a.run("vm", "stop", vm_name, "--force")
    a.run("remove", vm_name)
