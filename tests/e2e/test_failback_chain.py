"""Issue 17, item 9: the full round trip (planned failover a→b, reverse on b, planned
failover back b→a, reverse on a) leaves every failed-over VM on plain disks of its own
(a backing chain of depth 1, in its own folder, nothing in the replica storage), the
replica equal to the primary, only differences moved at each reverse, and `remove`
leaving nothing on either host. The merge is the first step of `reverse` (before it
tracks anything); the intent survives the daemon being killed between the failover and
the reverse. The steps run in order on one pair of hosts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness import lab
from helpers import images_identical

pytestmark = pytest.mark.e2e

VM = "fb"
DISK = 4 << 30


@pytest.fixture(scope="module")
def trip(lab_root, driver):
    a, b = lab.two_sites(lab_root / f"failback-{driver}", driver=driver)
    state: dict = {"a": a, "b": b, "timings": {}}
    yield state
    print("timings:", json.dumps(state["timings"]))
    lab.teardown(a, b)


def _chain(path: str) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    return [c["filename"] for c in (info if isinstance(info, list) else [info])]


def _chains(host) -> dict[str, list[str]]:
    return {d["name"]: _chain(d["path"]) for d in host.vm(VM)["disks"]}


def _assert_plain_own_disks(host):
    """Every disk of the VM on ``host``: one file (no backing), in the VM's own folder,
    and nothing of the VM left in the replica storage."""
    for disk, chain in _chains(host).items():
        assert len(chain) == 1, f"{host.name}/{disk}: {chain}"
        assert Path(chain[0]).parent == host.home / "vms" / VM, chain
    assert not (host.home / "storage" / VM).exists(), \
        sorted(map(str, (host.home / "storage" / VM).rglob("*")))


def _collapsed(host, after: int):
    events = host.json("events", VM, "--json")
    return [e for e in events if e["id"] > after and "collapsed" in e["message"]]


def _last_event(host) -> int:
    return max((e["id"] for e in host.json("events", VM, "--json")), default=0)


def _assert_collapsed(host, after: int):
    done = _collapsed(host, after)
    assert done, json.dumps(_chains(host))
    print(f"{host.name}: {done[-1]['message']}")


def _replica_equals_primary(primary, replica):
    """The VM is off on the primary (prepared): every replica head equals its disk."""
    heads = {d["name"]: d["path"] for d in replica.vm(VM)["disks"]}
    for d in primary.vm(VM)["disks"]:
        same, msg = images_identical(d["path"], heads[d["name"]])
        assert same, f"{d['path']} != {heads[d['name']]}: {msg}"


def step_replicating(trip):
    a, b = trip["a"], trip["b"]
    a.run("vm", "create", VM, "--disk", "4G", "--disk", "64M", "--guest", "demo")
    a.run("vm", "start", VM)
    a.run("enable", VM, "--replica", b.address, "--frequency", "30s",
          "--recovery-history", "3", "--point-interval", "2s")
    a.run("initial", VM)
    for _ in range(3):
        time.sleep(2.1)
        a.run("sync", VM)
    assert all(len(c) == 1 for c in _chains(a).values())
    assert all(len(c) >= 3 for c in _chains(b).values())   # base ← points ← head
    a.run("replica-server", "enable", "--allow", b.name)     # the way back


def step_planned_failover_keeps_the_chain_until_reverse(trip):
    a, b = trip["a"], trip["b"]
    a.run("failover", VM, "--prepare", "--shutdown")
    _replica_equals_primary(a, b)
    t0 = time.monotonic()
    b.run("failover", VM)
    trip["timings"]["failover_a_to_b"] = round(time.monotonic() - t0, 2)
    assert b.vm(VM)["state"] == "running"
    # The base moved into the VM's own folder (O(1)); the chain above it stays until
    # `reverse` merges it; the points went (their layers are about to be merged).
    for disk, chain in _chains(b).items():
        assert len(chain) >= 2 and chain[-1] == str(b.home / "vms" / VM / f"{disk}.qcow2")
    assert b.json("points", VM) == []


def step_reverse_collapses_then_moves_only_differences(trip):
    a, b = trip["a"], trip["b"]
    mark = _last_event(b)
    t0 = time.monotonic()
    info = b.json("reverse", VM)
    trip["timings"]["reverse_on_b"] = round(time.monotonic() - t0, 2)
    print(f"reverse moved {info['bytes_moved']} of {info['disk_bytes']} bytes")
    _assert_collapsed(b, mark)
    assert info["bytes_moved"] < 0.05 * DISK and info["disk_bytes"] >= DISK
    _assert_plain_own_disks(b)
    # site-a's chains stand on its own old disks: nothing was copied.
    for d in a.vm(VM)["disks"]:
        assert _chain(d["path"])[-1] == str(a.home / "vms" / VM / f"{d['name']}.qcow2")
    for _ in range(2):
        time.sleep(2.1)
        b.run("sync", VM)
    assert b.json("sync", VM, "--verify")["verified"]
    a_points = b.json("points", VM)
    assert a_points and all(p["host"] == a.name for p in a_points)   # the new replica's


def step_failback_survives_the_daemon_dying_before_reverse(trip):
    a, b = trip["a"], trip["b"]
    b.run("failover", VM, "--prepare", "--shutdown")
    _replica_equals_primary(b, a)
    t0 = time.monotonic()
    a.run("failover", VM)
    trip["timings"]["failover_b_to_a"] = round(time.monotonic() - t0, 2)
    os.kill(a.daemon_pid(), signal.SIGKILL)      # the merge's intent is in the row
    a.start()
    assert a.vm(VM)["state"] == "running"
    assert all(len(c) >= 2 for c in _chains(a).values())


def step_reverse_again_collapses_and_moves_only_differences(trip):
    a, b = trip["a"], trip["b"]
    mark = _last_event(a)
    t0 = time.monotonic()
    info = a.json("reverse", VM)
    trip["timings"]["reverse_on_a"] = round(time.monotonic() - t0, 2)
    print(f"failback reverse moved {info['bytes_moved']} of {info['disk_bytes']} bytes")
    _assert_collapsed(a, mark)
    assert info["bytes_moved"] < 0.05 * DISK
    assert a.vm(VM)["role"] == "primary" and b.vm(VM)["role"] == "replica"
    _assert_plain_own_disks(a)
    assert {d["path"] for d in a.vm(VM)["disks"]} == \
        {str(a.home / "vms" / VM / f"disk{i}.qcow2") for i in range(2)}   # its own, as before
    for d in b.vm(VM)["disks"]:      # site-b's chains stand on the disks it collapsed
        assert _chain(d["path"])[-1] == str(b.home / "vms" / VM / f"{d['name']}.qcow2")
    time.sleep(2.1)
    assert a.json("sync", VM, "--verify")["verified"]
    _assert_plain_own_disks(a)


def step_remove_on_the_replica_leaves_nothing(trip):
    a, b = trip["a"], trip["b"]
    a.run("vm", "stop", VM, "--force")
    b.run("remove", VM)                 # on the replica: it ends the primary's side too
    assert all(v["name"] != VM for v in b.json("vm", "list"))
    for h in (a, b):
        assert not (h.home / "storage" / VM).exists()
        assert not list((h.home / "staging").glob(f"{VM}/*"))
    assert not (b.home / "vms" / VM).exists()
    vm = a.vm(VM)
    assert vm["role"] == "none"
    _assert_plain_own_disks(a)
    for d in vm["disks"]:
        out = subprocess.run(["qemu-img", "info", "-U", "--output=json", d["path"]],
                             capture_output=True, text=True, check=True).stdout
        assert not json.loads(out).get("format-specific", {}).get("data", {}).get("bitmaps")


def step_remove_on_a_failed_over_host_keeps_the_vm(trip):
    """`remove` where the VM failed over to (never reversed): replication ends on both
    hosts, the VM goes on running there, on plain disks of its own (the chain merged
    first), nothing left in the replica storage. It used to delete the VM."""
    a, b = trip["a"], trip["b"]
    a.run("vm", "start", VM)
    a.run("enable", VM, "--replica", b.address, "--frequency", "30s")
    a.run("initial", VM)
    a.run("sync", VM)
    a.run("failover", VM, "--prepare", "--shutdown")
    b.run("failover", VM)
    assert all(len(c) >= 2 for c in _chains(b).values())
    mark = _last_event(b)
    b.run("remove", VM)
    _assert_collapsed(b, mark)
    vm = b.vm(VM)
    assert vm["state"] == "running" and vm["role"] == "none", vm
    _assert_plain_own_disks(b)
    assert a.vm(VM)["role"] == "none"             # the old primary's side ended too
    assert all(r["vm"] != VM for h in (a, b) for r in h.json("status"))


STEPS = [
    step_replicating,
    step_planned_failover_keeps_the_chain_until_reverse,
    step_reverse_collapses_then_moves_only_differences,
    step_failback_survives_the_daemon_dying_before_reverse,
    step_reverse_again_collapses_and_moves_only_differences,
    step_remove_on_the_replica_leaves_nothing,
    step_remove_on_a_failed_over_host_keeps_the_vm,
]


@pytest.mark.timeout(1800)
def test_steps_in_order(trip):
    """The steps are one round trip on one pair of hosts, in this order: each starts where
    the one before left the VM (so they are one test: a failing step stops the trip, and
    its name is in the traceback)."""
    for step in STEPS:
        print(f"-- {step.__name__}")
        step(trip)
