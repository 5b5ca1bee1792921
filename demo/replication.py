"""`make demo`: two hosts on this machine, the demo guest replicated between them.

Every step runs the real CLI (shown as `$ vmreplica ...`) against two real daemons that
talk mutual TLS on loopback. The demo guest writes a numbered record every 100 ms to its
last disk; the demo shows how far the replica is behind and that it is byte-exact.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from harness import lab
from vmreplica.hypervisor.guest import read_demo_records

VM = "demo-vm"


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(host: lab.LabHost, *args: str, show: bool = True) -> str:
    print(f"$ vmreplica --home {host.home} {' '.join(shlex.quote(a) for a in args)}", flush=True)
    out = host.run(*args).stdout
    if show and out.strip():
        print("  " + out.rstrip().replace("\n", "\n  "), flush=True)
    return out


def wait_for(what: str, check, timeout: float = 120.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(every)


def records(host: lab.LabHost, vm: str) -> dict:
    return read_demo_records(host.vm(vm)["disks"][-1]["path"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmreplica-demo")
    p.add_argument("--dir", default="demo-run", help="where the two host homes go")
    p.add_argument("--keep", action="store_true", help="leave both hosts running at the end")
    args = p.parse_args(argv)
    root = Path(args.dir).absolute()
    for old in (root / "a", root / "b"):  # a previous run's daemons and VMs
        if (old / "state.db").exists():
            lab.teardown(lab.LabHost(old, old.name))
    if root.exists():
        import shutil
        shutil.rmtree(root)
    root.mkdir(parents=True)
    root.chmod(0o755)

    step("Two hosts on this machine: site-a (primary) and site-b (replica)")
    a = lab.LabHost(root / "a", "site-a")
    b = lab.LabHost(root / "b", "site-b")
    for h in (a, b):
        run(h, "init", "--name", h.name, "--listen", h.address, "--accel", "auto")
        run(h, "serve", "--detach")
    try:
        step("Trust in one command pair: a one-time token on the replica, pinned certificates")
        token = run(b, "trust", "token").strip().splitlines()[-1]
        run(a, "trust", "pair", b.address, token)
        run(b, "replica-server", "enable", "--allow", "site-a")
        run(a, "replica-server", "enable", "--allow", "site-b")   # for the way back

        step("A VM on site-a running the demo guest (a record every 100 ms on its last disk)")
        run(a, "vm", "create", VM, "--disk", "256M", "--disk", "64M", "--guest", "demo")
        run(a, "vm", "start", VM)
        first = wait_for("the guest's first records", lambda: records(a, VM)["top"])
        print(f"  the guest is writing: record {first} on disk1")

        step("Replicate it to site-b every 30 s, a recovery point every 5 s (4 kept, "
             "every 2nd app-consistent through the guest agent)")
        run(a, "enable", VM, "--replica", b.address, "--frequency", "30s",
            "--recovery-history", "4", "--point-interval", "5s", "--app-consistent-every", "2")
        run(a, "initial", VM)
        run(b, "vm", "list")
        for _ in range(3):
            time.sleep(5)
            run(a, "sync", VM)
        on_a, on_b = records(a, VM), records(b, VM)
        print(f"  site-a's disk is at record {on_a['top']}; site-b's replica holds records "
              f"1..{on_b['contiguous']} with no gap")
        run(a, "status")
        run(b, "points", VM)

        step("Test failover on site-b from the oldest point: a throw-away VM, replication goes on")
        oldest = [p for p in b.json("points", VM) if p["id"] != "latest"][0]["id"]
        run(b, "failover", VM, "--test", "--point", str(oldest))
        run(a, "sync", VM)
        seen = wait_for("the test VM's guest", lambda: records(b, f"{VM}-test")["top"])
        print(f"  {VM}-test boots from point {oldest} and writes on from record {seen}")
        run(b, "failover", VM, "--stop-test")

        step("Planned failover to site-b: shut down, final cycle, zero loss")
        run(a, "failover", VM, "--prepare", "--shutdown")
        last = records(a, VM)["top"]
        run(b, "failover", VM)
        now = wait_for("the failed-over guest", lambda: (records(b, VM)["contiguous"] > last + 5)
                       and records(b, VM))
        print(f"  site-a's last record was {last}; on site-b the guest continues: records "
              f"1..{now['contiguous']}, no gap: {'yes' if now['gap_at'] is None else 'NO'}")
        run(b, "status")

        step("Reverse replication: site-b is the primary, site-a its replica (only differences move)")
        run(b, "reverse", VM)
        run(a, "status")

        step("Failback: the same way home, then reverse again")
        run(b, "failover", VM, "--prepare", "--shutdown")
        last = records(b, VM)["top"]
        run(a, "failover", VM)
        run(a, "reverse", VM)
        now = wait_for("the guest back on site-a",
                       lambda: (records(a, VM)["contiguous"] > last + 5) and records(a, VM))
        print(f"  site-b's last record was {last}; back on site-a the guest continues: "
              f"records 1..{now['contiguous']}, no gap: {'yes' if now['gap_at'] is None else 'NO'}")
        run(a, "sync", VM, "--verify")
        run(a, "status")
        run(a, "points", VM)
        if now["gap_at"] is not None:
            print("demo: a record is missing", file=sys.stderr)
            return 1
        print("\nThe demo VM was replicated, tested, failed over, reversed and failed back.")
        if args.keep:
            print("Both hosts keep running; explore with, for example:\n"
                  f"  VMREPLICA_HOME={a.home} .venv/bin/vmreplica status\n"
                  f"  VMREPLICA_HOME={b.home} .venv/bin/vmreplica points {VM}")
    finally:
        if not args.keep:
            step("Stopping both hosts")
            lab.teardown(a, b)
            print(f"  (homes kept in {root}; `make demo` starts afresh; to explore the running "
                  "hosts: .venv/bin/python -m demo.replication --keep)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
