"""`make demo-ha`: high availability on a real Pacemaker/Corosync cluster on this machine.

Two cluster nodes and a corosync-qnetd witness, each in its own namespaces
(tests/harness/nslab.py), fencing on; a vmreplica daemon on each node; the demo guest
protected by the cluster in continuous mode. The demo pulls the plug on the node that
runs the guest, shows the guest running on the other node with its records continuing,
powers the node back on (it rejoins as SECOND, only the differences move), then moves the
VM back with a planned, zero-loss hand-over. A third site, on the witness machine, holds
a periodic DR link that follows the VM each time. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from harness.hasite import HASite, poll
from harness.nslab import ClusterLab, namespaces_available


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def echo(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmreplica-demo-ha")
    p.add_argument("--dir", default="/tmp/vmreplica-demo-ha",
                   help="where the lab and the node homes go (a short path: unix sockets)")
    args = p.parse_args(argv)
    ok, why = namespaces_available()
    if not ok:
        print(f"demo-ha: cannot build the cluster lab here: {why}", file=sys.stderr)
        return 2
    from vmreplica.cluster import agent
    agent.install()
    root = Path(args.dir).absolute()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    root.chmod(0o755)

    step("A two-node cluster and a witness in namespaces: Corosync (knet), Pacemaker, "
         "corosync-qnetd; fencing by a PDU that pulls a node's plug")
    lab = ClusterLab(root / "lab")
    site = HASite(lab, root / "homes", vm="demo-vm", echo=echo)
    lab.start()
    try:
        print(f"cluster formed in {lab.wait_formed(90):.1f} s; nodes {', '.join(lab.nodes)} "
              f"({', '.join(lab.address(n) for n in lab.nodes)}), witness "
              f"{lab.witness_address()}", flush=True)

        step("vmreplica on both nodes, the demo guest on node1, protected by the cluster "
             "(continuous replication to node2 + a Pacemaker resource)")
        site.build(poll)
        site.vmr("node1", "cluster", "status")

        step("Disaster recovery: a third site (on the witness machine) gets a periodic DR "
             "link from the node that runs the VM; it will follow the VM")
        dr = site.add_dr_site()
        key = f"{site.vm}@dr"
        site.vmr("node1", "enable", site.vm, "--replica", dr, "--dr", "--frequency", "30s")
        site.vmr("node1", "initial", key)

        def dr_link(node: str) -> None:
            poll(f"the DR link replicating from {node}",
                 lambda: site.json(node, "status", key)[0]["state"] == "replicating",
                 timeout=180)
            moved = [e["message"] for e in site.json(node, "events", key)
                     if "resynchronized" in e["message"]]
            print(f"{node} took the DR link over: {moved[-1] if moved else ''}", flush=True)
            site.vmr(node, "status", key)

        step("Pull the plug on node1 (the node running the guest)")
        a, b = "node1", "node2"
        t0 = time.monotonic()
        lab.power_off(a)
        poll("the VM running on node2", lambda: site.running_on(b) == [b], timeout=60)
        t_run = time.monotonic() - t0
        last = site.records(b)["contiguous"]
        poll("the guest writing on node2", lambda: site.records(b)["contiguous"] > last + 3,
             timeout=120)
        t_write = time.monotonic() - t0
        rec = site.records(b)
        print(f"node2 runs the VM {t_run:.1f} s after the power-off; the guest writes again "
              f"after {t_write:.1f} s; records 1..{rec['contiguous']} with "
              f"{'no gap' if rec['gap_at'] is None else 'a gap at ' + str(rec['gap_at'])}",
              flush=True)
        site.vmr(b, "cluster", "status")
        dr_link(b)

        step("Power node1 back on: it learns it was replaced and rejoins as the replica")
        lab.power_on(a)
        lab.wait_formed(90)
        poll("PRIM/SECOND", lambda: site.states(b) == {b: "PRIM", a: "SECOND"}, timeout=180)
        moved = [e["message"] for e in site.json(b, "events", site.vm)
                 if "resynchronized" in e["message"]]
        print(moved[-1] if moved else "", flush=True)
        site.vmr(b, "cluster", "status")

        step("Planned move back to node1 (zero loss: the mirror was in sync)")
        before = site.records(b)["contiguous"]
        site.vmr(b, "cluster", "move", site.vm, a, timeout=400)
        poll("the guest writing on node1", lambda: site.records(a)["contiguous"] > before + 3,
             timeout=120)
        rec = site.records(a)
        print(f"records 1..{rec['contiguous']} on node1, "
              f"{'no gap' if rec['gap_at'] is None else 'a gap at ' + str(rec['gap_at'])}",
              flush=True)
        poll("PRIM/SECOND", lambda: site.states(a) == {a: "PRIM", b: "SECOND"}, timeout=180)
        site.vmr(a, "cluster", "status")
        dr_link(a)
        cpu0, t0 = lab.stack_cpu_seconds(), time.monotonic()
        time.sleep(5)
        cpu1, dt = lab.stack_cpu_seconds(), time.monotonic() - t0
        used = sum(cpu1.values()) - sum(cpu0.values())
        print(f"\ncluster stack at idle (corosync, qdevice, qnetd, pacemaker on both nodes): "
              f"{100 * used / dt:.1f} % of one core", flush=True)
        print("\ndemo-ha: done", flush=True)
        return 0
    finally:
        step("Tearing the lab down")
        site.quiesce()
        lab.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
