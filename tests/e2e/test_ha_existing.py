"""`cluster protect` of an operator's existing libvirt domain on a real Pacemaker/Corosync
cluster (harness.nslab: two nodes and a corosync-qnetd witness in namespaces, fencing on,
a libvirtd per node): the domain is defined with virsh on the first node (the demo guest
with two qcow2 disks of its own, outside any vmreplica home, and a NIC on a libvirt
network both nodes have), protected — continuous
replication to the other node, whose replica VM is vmr-node2-NAME with the NIC mapped
by `--network-map`, plus its Pacemaker resource — and in sync (PRIM/SECOND). The first node's power-off fails it over: the
replica VM runs on the other node, and the replica held every record the guest had
written on the node that died (continuous: nothing acknowledged is lost); the node comes
back as SECOND, the operator's domain its replica (only the differences move); a planned
move brings the guest home to the operator's domain, as it is, with nothing lost."""

from __future__ import annotations

import os
import time

import pytest

from harness.hasite import MAC, NETWORK, HASite, events_tail, poll
from harness.nslab import ClusterLab, namespaces_available
from vmreplica.cluster import agent
from vmreplica.hypervisor.guest import read_demo_records

pytestmark = pytest.mark.e2e

VM = "ops-ha"


@pytest.fixture(scope="module")
def site(lab_root):
    ok, why = namespaces_available()
    if not ok:
        pytest.skip(f"network/PID namespaces are not available here: {why}")
    agent.install()
    root = lab_root / "ha-existing"
    root.mkdir()
    os.chmod(root, 0o755)
    lab = ClusterLab(root / "lab", libvirtd=True)
    s = HASite(lab, root / "homes", vm=VM, driver="libvirt", existing=True)
    try:
        lab.start()
        print(f"cluster formed in {lab.wait_formed(90):.1f} s")
        # (its NIC on the nodes' network vmrlan: the replica VM's on the other node's)
        s.build(lambda what, fn, timeout=60: _wait(s, what, fn, timeout),
                protect=("--network-map", f"{NETWORK}={NETWORK}"))
        yield s
    finally:
        if lab.is_on(lab.nodes[0]) or lab.is_on(lab.nodes[1]):
            s.quiesce()
        lab.stop()


def _diagnosis(s: HASite) -> str:
    out = []
    for n in s.lab.nodes:
        if s.lab.is_on(n):
            mon = s.lab.run(n, ["crm_mon", "-1", "--failcounts", "--inactive"], timeout=20)
            out.append(f"--- {n}: crm_mon\n{mon.stdout}")
        else:
            out.append(f"--- {n}: off")
        try:
            tail = (s.homes[n] / "daemon.log").read_text(errors="replace").splitlines()
        except OSError:
            tail = []
        out.append(f"--- {n}: daemon.log\n" + "\n".join(tail[-30:]))
        out.append(f"--- {n}: events\n" + events_tail(s.homes[n], 60))
    return "\n".join(out)


def _wait(s: HASite, what, fn, timeout=60, every=0.25):
    try:
        return poll(what, fn, timeout, every)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{_diagnosis(s)}") from None


@pytest.mark.timeout(900)
def test_protected_existing_domain_fails_over_loses_nothing_and_comes_home(site):
    s = site
    a, b = s.lab.nodes
    assert s.running_on() == [a] and s.qemu_nodes() == [a]
    shown = s.json(a, "vm", "show", VM)
    assert shown["origin"] == "existing"
    st = s.json(a, "status", VM)[0]
    assert st["mode"] == "continuous" and st["sync_state"] == "in_sync", st
    replica = s.json(b, "vm", "show", VM)
    assert replica["role"] == "replica" and MAC in str(replica["nics"]), replica
    disk_a = shown["disks"][-1]["path"]
    head_b = s.json(b, "vm", "show", VM)["disks"][-1]["path"]     # the replica's head
    _wait(s, "the guest writing through the mirror",
          lambda: (read_demo_records(disk_a)["top"] or 0) > 20)

    # The node running the operator's domain loses power.
    t0 = time.monotonic()
    s.lab.power_off(a)
    on_a = read_demo_records(disk_a)
    # What the replica held when the node died (the failover starts the VM on overlays
    # above this head: it is not written again): every record the guest had written
    # there, but one in flight.
    on_b = read_demo_records(head_b)
    assert on_b["gap_at"] is None and on_b["contiguous"] >= on_a["contiguous"] - 1, (on_a, on_b)
    _wait(s, "the VM on the other node", lambda: s.running_on(b) == [b], timeout=30)
    t_run = time.monotonic() - t0
    _wait(s, "the guest writing there",
          lambda: s.records(b)["contiguous"] > on_a["contiguous"] + 3, timeout=60)
    print(f"\n[ha existing] {a} powered off: {VM} running on {b} {t_run:.1f} s after, new "
          f"records {time.monotonic() - t0:.1f} s after; {on_a['contiguous']} records on "
          f"{a}, {on_b['contiguous']} on {b}'s replica")
    assert t_run < 15
    assert s.records(b)["gap_at"] is None
    assert s.qemu_nodes() == [b]
    assert s.states(b).get(b) == "ALONE" and s.states(b).get(a) == "STOP"

    # The node comes back: the operator's domain is the replica, only differences move.
    s.lab.power_on(a)
    s.lab.wait_formed(90)
    _wait(s, f"{a} back as SECOND", lambda: s.states(b) == {b: "PRIM", a: "SECOND"},
          timeout=180)
    moved = [e["message"] for e in s.json(b, "events", VM) if "resynchronized" in e["message"]]
    assert moved, "\n".join(e["message"] for e in s.json(b, "events", VM))
    print(f"[ha existing] rejoin: {moved[-1]}")
    assert s.json(a, "vm", "show", VM)["origin"] == "existing"

    # A planned move home: the operator's domain runs again, nothing lost.
    last = s.records(b)["contiguous"]
    s.vmr(b, "cluster", "move", VM, a, timeout=400)
    assert s.running_on() == [a]
    _wait(s, "records at home", lambda: s.records(a)["contiguous"] > last + 3)
    assert s.records(a)["gap_at"] is None
    assert s.qemu_nodes() == [a]
    _wait(s, "PRIM/SECOND at home", lambda: s.states(a) == {a: "PRIM", b: "SECOND"},
          timeout=180)
